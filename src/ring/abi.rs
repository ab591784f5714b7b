//! The FUSE wire format as the io_uring transport sees it: a request's
//! fixed header (`fuse_in_header`) and its operation's header (`op_in`) in
//! the entry's 288-byte header buffer, names and write data in its payload
//! buffer; a reply's `fuse_out_header` in the header buffer and its body in
//! the payload. Layouts are those of `<linux/fuse.h>` (ABI 7.45),
//! little-endian.
//!
//! Owns: decoding a request's arguments and encoding the answers. Knows
//! nothing of rings or of what an operation does.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::time::SystemTime;

use fuser::{FileAttr, FileType, TimeOrNow};

use crate::fs::{since_epoch, system_time};

/// `struct fuse_uring_req_header`: in_out, op_in, ring_ent_in_out.
pub const HEADER_LEN: usize = 288;
pub const OP_IN: usize = 128;
pub const ENT_IN_OUT: usize = 256;

/// `enum fuse_uring_cmd`.
pub const CMD_REGISTER: u32 = 1;
pub const CMD_COMMIT_AND_FETCH: u32 = 2;

pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const DESTROY: u32 = 38;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
    pub const COPY_FILE_RANGE: u32 = 47;
}

/// `fuse_setattr_in.valid` bits.
const FATTR_MODE: u32 = 1 << 0;
const FATTR_UID: u32 = 1 << 1;
const FATTR_GID: u32 = 1 << 2;
const FATTR_SIZE: u32 = 1 << 3;
const FATTR_ATIME: u32 = 1 << 4;
const FATTR_MTIME: u32 = 1 << 5;
const FATTR_FH: u32 = 1 << 6;
const FATTR_ATIME_NOW: u32 = 1 << 7;
const FATTR_MTIME_NOW: u32 = 1 << 8;

/// `fuse_getattr_in.getattr_flags`: `fh` is valid.
pub const GETATTR_FH: u32 = 1;
/// `fuse_write_in.write_flags`: the writer lacks CAP_FSETID.
pub const WRITE_KILL_SUIDGID: u32 = 1 << 2;
/// `fuse_fsync_in.fsync_flags`.
pub const FSYNC_FDATASYNC: u32 = 1;

/// Reads little-endian fields of an operation's header. A short header
/// reads as zeros, which no field's meaning depends on being absent.
pub struct Fields<'a>(pub &'a [u8]);

impl Fields<'_> {
    pub fn u32(&self, at: usize) -> u32 {
        self.0
            .get(at..at + 4)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&self, at: usize) -> u64 {
        self.0.get(at..at + 8).map_or(0, |b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    }
}

/// `struct fuse_in_header`.
#[derive(Clone, Copy, Debug)]
pub struct InHeader {
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl InHeader {
    pub fn parse(b: &[u8]) -> InHeader {
        let f = Fields(b);
        InHeader {
            opcode: f.u32(4),
            unique: f.u64(8),
            nodeid: f.u64(16),
            uid: f.u32(24),
            gid: f.u32(28),
            pid: f.u32(32),
        }
    }
}

/// The `N` NUL-terminated strings at the start of a payload, in order.
pub fn names<const N: usize>(payload: &[u8]) -> Option<[OsString; N]> {
    let mut rest = payload;
    let mut out: [OsString; N] = std::array::from_fn(|_| OsString::new());
    for name in out.iter_mut() {
        let end = rest.iter().position(|&c| c == 0)?;
        *name = OsStr::from_bytes(&rest[..end]).to_os_string();
        rest = &rest[end + 1..];
    }
    Some(out)
}

/// The rest of a payload after `n` NUL-terminated strings.
pub fn after_names(payload: &[u8], n: usize) -> Option<&[u8]> {
    let mut rest = payload;
    for _ in 0..n {
        let end = rest.iter().position(|&c| c == 0)?;
        rest = &rest[end + 1..];
    }
    Some(rest)
}

fn time_or_now(valid: u32, set: u32, now: u32, secs: u64, nsecs: u32) -> Option<TimeOrNow> {
    if valid & set == 0 {
        None
    } else if valid & now != 0 {
        Some(TimeOrNow::Now)
    } else {
        Some(TimeOrNow::SpecificTime(system_time(secs as i64, nsecs as i64)))
    }
}

/// `struct fuse_setattr_in`, as `fs::Changes`.
pub fn setattr(op_in: &[u8]) -> crate::fs::Changes {
    let f = Fields(op_in);
    let valid = f.u32(0);
    let pick = |bit: u32, v: u32| (valid & bit != 0).then_some(v);
    crate::fs::Changes {
        mode: pick(FATTR_MODE, f.u32(68)),
        uid: pick(FATTR_UID, f.u32(76)),
        gid: pick(FATTR_GID, f.u32(80)),
        size: (valid & FATTR_SIZE != 0).then_some(f.u64(16)),
        atime: time_or_now(valid, FATTR_ATIME, FATTR_ATIME_NOW, f.u64(32), f.u32(56)),
        mtime: time_or_now(valid, FATTR_MTIME, FATTR_MTIME_NOW, f.u64(40), f.u32(60)),
        fh: (valid & FATTR_FH != 0).then_some(f.u64(8)),
    }
}

/// Appends little-endian fields to a reply body.
pub struct Body<'a> {
    pub buf: &'a mut [u8],
    pub len: usize,
}

impl Body<'_> {
    /// Room left.
    pub fn room(&self) -> usize {
        self.buf.len() - self.len
    }

    pub fn bytes(&mut self, b: &[u8]) {
        self.buf[self.len..self.len + b.len()].copy_from_slice(b);
        self.len += b.len();
    }

    pub fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }

    pub fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }

    pub fn zeros(&mut self, n: usize) {
        self.buf[self.len..self.len + n].fill(0);
        self.len += n;
    }
}

/// `struct fuse_attr`, and `fuse_entry_out` around it.
const ATTR_LEN: usize = 88;
const ENTRY_OUT_LEN: usize = 40 + ATTR_LEN;
const DIRENT_LEN: usize = 24;

/// A time as `fuse_attr` holds it: seconds (two's complement before the
/// epoch) and nanoseconds.
fn parts(t: SystemTime) -> (u64, u32) {
    let (secs, nanos) = since_epoch(t);
    (secs as u64, nanos as u32)
}

fn type_bits(kind: FileType) -> u32 {
    match kind {
        FileType::Directory => libc::S_IFDIR,
        FileType::Symlink => libc::S_IFLNK,
        FileType::NamedPipe => libc::S_IFIFO,
        FileType::Socket => libc::S_IFSOCK,
        FileType::CharDevice => libc::S_IFCHR,
        FileType::BlockDevice => libc::S_IFBLK,
        FileType::RegularFile => libc::S_IFREG,
    }
}

fn dtype(kind: FileType) -> u32 {
    type_bits(kind) >> 12
}

/// `struct fuse_attr`.
pub fn attr(b: &mut Body, a: &FileAttr) {
    let (at, atn) = parts(a.atime);
    let (mt, mtn) = parts(a.mtime);
    let (ct, ctn) = parts(a.ctime);
    b.u64(a.ino.0);
    b.u64(a.size);
    b.u64(a.blocks);
    b.u64(at);
    b.u64(mt);
    b.u64(ct);
    b.u32(atn);
    b.u32(mtn);
    b.u32(ctn);
    b.u32(type_bits(a.kind) | a.perm as u32);
    b.u32(a.nlink);
    b.u32(a.uid);
    b.u32(a.gid);
    b.u32(a.rdev);
    b.u32(a.blksize);
    b.u32(a.flags);
}

/// `struct fuse_entry_out`, valid for `ttl` seconds.
pub fn entry_out(b: &mut Body, a: &FileAttr, ttl: std::time::Duration) {
    b.u64(a.ino.0);
    b.u64(0); // generation
    b.u64(ttl.as_secs());
    b.u64(ttl.as_secs());
    b.u32(ttl.subsec_nanos());
    b.u32(ttl.subsec_nanos());
    attr(b, a);
}

/// `struct fuse_attr_out`.
pub fn attr_out(b: &mut Body, a: &FileAttr, ttl: std::time::Duration) {
    b.u64(ttl.as_secs());
    b.u32(ttl.subsec_nanos());
    b.u32(0);
    attr(b, a);
}

/// `struct fuse_open_out`.
pub fn open_out(b: &mut Body, fh: u64, flags: u32) {
    b.u64(fh);
    b.u32(flags);
    b.u32(0); // backing_id
}

fn dirent_len(name: &OsStr) -> usize {
    (DIRENT_LEN + name.len()).next_multiple_of(8)
}

/// `struct fuse_dirent`, padded to 8 bytes; false if it does not fit.
pub fn dirent(b: &mut Body, ino: u64, offset: u64, kind: FileType, name: &OsStr) -> bool {
    let len = dirent_len(name);
    if len > b.room() {
        return false;
    }
    b.u64(ino);
    b.u64(offset);
    b.u32(name.len() as u32);
    b.u32(dtype(kind));
    b.bytes(name.as_bytes());
    b.zeros(len - DIRENT_LEN - name.len());
    true
}

/// `struct fuse_direntplus`; false if it does not fit.
pub fn direntplus(b: &mut Body, offset: u64, name: &OsStr, a: &FileAttr, ttl: std::time::Duration) -> bool {
    if ENTRY_OUT_LEN + dirent_len(name) > b.room() {
        return false;
    }
    entry_out(b, a, ttl);
    dirent(b, a.ino.0, offset, a.kind, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_the_rest_of_a_payload() {
        let p = b"old\0new\0value";
        let n = names::<2>(p).unwrap();
        assert_eq!(n, [OsString::from("old"), OsString::from("new")]);
        assert_eq!(after_names(p, 2).unwrap(), b"value");
        assert!(names::<1>(b"unterminated").is_none());
    }

    #[test]
    fn setattr_reads_only_the_valid_fields() {
        let mut b = [0u8; 88];
        b[0..4].copy_from_slice(&(FATTR_MODE | FATTR_MTIME | FATTR_MTIME_NOW | FATTR_FH).to_le_bytes());
        b[8..16].copy_from_slice(&7u64.to_le_bytes());
        b[16..24].copy_from_slice(&99u64.to_le_bytes());
        b[68..72].copy_from_slice(&0o4755u32.to_le_bytes());
        let c = setattr(&b);
        assert_eq!(c.mode, Some(0o4755));
        assert_eq!(c.fh, Some(7));
        assert_eq!(c.size, None, "size is not valid");
        assert!(matches!(c.mtime, Some(TimeOrNow::Now)));
        assert!(c.atime.is_none() && c.uid.is_none() && c.gid.is_none());
    }

    #[test]
    fn a_dirent_is_padded_and_refused_when_full() {
        let mut buf = [0u8; 40];
        let mut b = Body { buf: &mut buf, len: 0 };
        assert!(dirent(&mut b, 5, 1, FileType::Directory, OsStr::new("abc")));
        assert_eq!(b.len, 32);
        assert!(!dirent(&mut b, 6, 2, FileType::RegularFile, OsStr::new("x")));
        assert_eq!(b.len, 32);
        assert_eq!(Fields(&buf).u32(20), libc::S_IFDIR >> 12);
    }
}
