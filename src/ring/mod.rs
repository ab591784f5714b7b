//! FUSE over io_uring: the kernel hands requests to ring entries and takes
//! each answer, and the entry's next request, in one `io_uring_enter`.
//!
//! Owns: the ring threads, their entries' buffers, decoding a request into
//! a call of `fs`'s operation and the answer's commit. Knows nothing of
//! sides: an operation is served exactly as on the classic transport.
//!
//! Why: on `/dev/fuse` each request costs a `read` that wakes a server
//! thread and a `write` of the answer. Here a thread sleeps in one
//! `io_uring_enter` that commits the answer and waits for the next
//! request: one system call per request. Measured (fsync'd 4 KiB writes,
//! creates, stats): 24.8, 25.9 and 3.7 context switches per operation on
//! `/dev/fuse`, 19.0, 19.7 and 3.6 here.
//!
//! The kernel has one queue per possible CPU and routes a request to the
//! queue of the CPU its caller runs on; it starts doing so once every
//! queue has an entry. Each ring thread owns one ring with one entry, so a
//! thread busy with (or stuck in) a request holds exactly that entry and
//! the queue's other threads go on. FORGET, INTERRUPT and INIT still come
//! through `/dev/fuse`, to fuser's threads, which also serve everything
//! if the ring cannot be set up.
//!
//! A hung side: the request's rescuer (`engine::inline`) answers in
//! another thread. It writes the answer into the entry's buffers and
//! commits it from a new ring on a new thread, which serves the entry from
//! then on (the kernel accepts a commit from any ring, by queue and
//! request id). The hung thread, if it ever returns, finds its request
//! answered and ends without touching the entry.

pub mod abi;

use std::cell::UnsafeCell;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use fuser::{Errno, FileAttr, FileType, FopenFlags};
use io_uring::{IoUring, cqueue, opcode, squeue, types};

use crate::engine::bufpool::PooledBuf;
use crate::engine::inline;
use crate::fs::{MirrorFs, Who};
use crate::reply::{self, TTL};
use abi::{Body, Fields, InHeader, op};

/// The kernel's switch for the transport.
pub const ENABLE: &str = "/sys/module/fuse/parameters/enable_uring";

/// Set to 0 in the environment, the mount uses `/dev/fuse` alone.
pub const ENV: &str = "MIRRORFS_URING";

/// True if this mount should ask for FUSE over io_uring: the kernel
/// allows it and the environment does not turn it off.
pub fn wanted() -> bool {
    if std::env::var(ENV).is_ok_and(|v| v == "0") {
        return false;
    }
    std::fs::read_to_string(ENABLE).is_ok_and(|v| matches!(v.trim(), "Y" | "1"))
}

/// The CPUs the kernel may run on (`/sys/devices/system/cpu/possible`,
/// e.g. "0-1"): one queue each.
fn possible_cpus() -> io::Result<usize> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut n = 0;
    for part in s.trim().split(',') {
        let last = part.rsplit('-').next().unwrap_or(part);
        let last: usize = last.parse().map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        n = n.max(last + 1);
    }
    Ok(n.max(1))
}

/// What every entry of a mount shares.
struct Shared {
    fs: MirrorFs,
    dev: OwnedFd,
    payload_len: usize,
}

/// One ring entry: its buffers, which the kernel writes a request into
/// and reads the answer from, and the queue it belongs to.
///
/// Ownership: the buffers are touched by one thread at a time, the one
/// serving the entry's current request (or its rescuer, which answers
/// instead of it), and by the kernel only between a commit and the next
/// completion. The hung thread of a rescued request never touches them
/// again.
struct Entry {
    shared: Arc<Shared>,
    qid: u16,
    header: UnsafeCell<Box<[u8; abi::HEADER_LEN]>>,
    payload: UnsafeCell<Box<[u8]>>,
    iov: UnsafeCell<[libc::iovec; 2]>,
}

// SAFETY: see the ownership rule above.
unsafe impl Send for Entry {}
unsafe impl Sync for Entry {}

impl Entry {
    fn new(shared: Arc<Shared>, qid: u16) -> Arc<Entry> {
        let payload = vec![0u8; shared.payload_len].into_boxed_slice();
        let e = Arc::new(Entry {
            shared,
            qid,
            header: UnsafeCell::new(Box::new([0u8; abi::HEADER_LEN])),
            payload: UnsafeCell::new(payload),
            iov: UnsafeCell::new(
                [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; 2],
            ),
        });
        // SAFETY: no one else holds the entry yet.
        unsafe {
            let iov = &mut *e.iov.get();
            let h = &mut *e.header.get();
            let p = &mut *e.payload.get();
            iov[0] = libc::iovec {
                iov_base: h.as_mut_ptr().cast(),
                iov_len: h.len(),
            };
            iov[1] = libc::iovec {
                iov_base: p.as_mut_ptr().cast(),
                iov_len: p.len(),
            };
        }
        e
    }

    /// SAFETY: only by the entry's current owner (see `Entry`).
    #[allow(clippy::mut_from_ref)]
    unsafe fn header(&self) -> &mut [u8; abi::HEADER_LEN] {
        unsafe { &mut *self.header.get() }
    }

    /// SAFETY: only by the entry's current owner (see `Entry`).
    #[allow(clippy::mut_from_ref)]
    unsafe fn payload(&self) -> &mut [u8] {
        unsafe { &mut *self.payload.get() }
    }

    /// The request id of the request the entry holds.
    fn commit_id(&self) -> u64 {
        // SAFETY: read by the owner only.
        let h = unsafe { self.header() };
        Fields(&h[abi::ENT_IN_OUT..]).u64(8)
    }

    /// The command that registers the entry, or commits its answer and
    /// fetches its next request.
    fn command(&self, cmd_op: u32) -> squeue::Entry128 {
        let mut cmd = [0u8; 80];
        if cmd_op == abi::CMD_COMMIT_AND_FETCH {
            cmd[8..16].copy_from_slice(&self.commit_id().to_le_bytes());
        }
        cmd[16..18].copy_from_slice(&self.qid.to_le_bytes());
        let sqe = opcode::UringCmd80::new(types::Fd(self.shared.dev.as_raw_fd()), cmd_op)
            .cmd(cmd)
            .addr(Some(self.iov.get() as u64))
            .build();
        // The kernel wants the iovec count (2) in `len`, which the builder
        // does not set: it is the u32 at byte 24 of the SQE.
        // SAFETY: Entry128 is a repr(C) 128-byte SQE.
        let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
        raw[24..28].copy_from_slice(&2u32.to_le_bytes());
        // SAFETY: as above.
        unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
    }
}

/// Ring threads per queue at least: one stuck in a hung side leaves
/// another.
const MIN_PER_QUEUE: usize = 2;

/// Registrations refused with EAGAIN (INIT's answer not taken yet) are
/// tried again every millisecond, this many times.
const REGISTER_RETRIES: u32 = 5_000;

/// Starts about `threads` ring threads, as many per possible CPU, for the
/// mount whose `/dev/fuse` is `dev`, right after its INIT was answered
/// with FUSE_OVER_IO_URING. Returns the number of entries whose
/// registration the kernel took. If any is refused, the kernel falls back
/// to `/dev/fuse` for everything.
pub fn start(fs: MirrorFs, dev: OwnedFd, threads: usize, payload_len: usize) -> io::Result<usize> {
    let queues = possible_cpus()?;
    let per_queue = (threads / queues).max(MIN_PER_QUEUE);
    let shared = Arc::new(Shared { fs, dev, payload_len });
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut started = 0;
    for qid in 0..queues {
        for i in 0..per_queue {
            let entry = Entry::new(shared.clone(), qid as u16);
            let tx = tx.clone();
            std::thread::Builder::new()
                .name(format!("ring-{qid}.{i}"))
                .spawn(move || serve(entry, abi::CMD_REGISTER, Some(tx)))?;
            started += 1;
        }
    }
    drop(tx);
    let mut registered = 0;
    for _ in 0..started {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => registered += 1,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(io::Error::from_raw_os_error(libc::ETIMEDOUT)),
        }
    }
    Ok(registered)
}

/// Serves `entry` on a ring of this thread's own: sends `first` (register
/// the entry, or commit the answer a rescuer wrote), then answers each
/// request the kernel puts in the entry, until the connection ends or a
/// rescuer takes the entry over. `registered` hears whether the
/// registration was taken.
fn serve(entry: Arc<Entry>, first: u32, mut registered: Option<crossbeam_channel::Sender<io::Result<()>>>) {
    // Not pinned to the queue's CPU, as libfuse's threads are: measured
    // with fsync'd 4 KiB writes, pinned threads cost 21.3 context switches
    // per write and unpinned 19.0 (stats 2.4 and 3.6, creates 16.6 and
    // 19.7); the database's path is the fsync'd write.
    let mut ring: IoUring<squeue::Entry128, cqueue::Entry> = match IoUring::builder().build(2) {
        Ok(r) => r,
        Err(e) => {
            log::error!("ring setup: {e}");
            if let Some(tx) = registered.take() {
                let _ = tx.send(Err(e));
            }
            return;
        }
    };
    let mut cmd = first;
    // INIT is answered before the ring starts, but the kernel may not have
    // taken the answer yet (EAGAIN): retried for as long as `start` waits.
    let mut retries = 0;
    loop {
        let sqe = entry.command(cmd);
        // SAFETY: the SQE points at the entry's iovecs and buffers, which
        // live as long as the entry, which outlives the connection's use
        // of them (the Arc is held by whoever serves it).
        if unsafe { ring.submission().push(&sqe) }.is_err() {
            log::error!("ring full");
            return;
        }
        // A request the kernel put in the entry as soon as it was
        // registered (the first requests of a mount wait for the ring).
        let mut delivered = None;
        if let Some(tx) = registered.take() {
            // A refused registration completes at once; a taken one only
            // when a request comes, which may be at once too: that
            // completion is the entry's first request, not to be dropped.
            let r = ring.submit();
            let first = ring.completion().next().map(|c| c.result());
            match (r, first) {
                (Err(e), _) => {
                    let _ = tx.send(Err(e));
                    return;
                }
                (_, Some(e)) if -e == libc::EAGAIN && retries < REGISTER_RETRIES => {
                    retries += 1;
                    registered = Some(tx);
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                (_, Some(e)) if e < 0 => {
                    let _ = tx.send(Err(io::Error::from_raw_os_error(-e)));
                    return;
                }
                (Ok(_), first) => {
                    let _ = tx.send(Ok(()));
                    delivered = first;
                }
            }
        }
        let res = match delivered {
            Some(res) => res,
            None => loop {
                match ring.submit_and_wait(1) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(e) => {
                        log::error!("ring wait: {e}");
                        return;
                    }
                }
                if let Some(c) = ring.completion().next() {
                    break c.result();
                }
            },
        };
        match -res {
            0 => {}
            libc::EAGAIN if cmd == abi::CMD_REGISTER && retries < REGISTER_RETRIES => {
                retries += 1;
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            // Unmounted, or the connection was aborted.
            libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED | libc::ENODEV => return,
            e => {
                log::error!("ring entry queue={}: {}", entry.qid, io::Error::from_raw_os_error(e));
                return;
            }
        }
        if !answer(&entry) {
            // A rescuer answered, and serves the entry from now on.
            return;
        }
        cmd = abi::CMD_COMMIT_AND_FETCH;
    }
}

/// Decodes the request in `entry` and serves it. False if a rescuer
/// answers it instead of this thread.
fn answer(entry: &Arc<Entry>) -> bool {
    // SAFETY: this thread owns the entry until it commits.
    let (h, op_in, payload) = unsafe {
        let hb = entry.header();
        let len = (Fields(&hb[abi::ENT_IN_OUT..]).u32(16) as usize).min(entry.shared.payload_len);
        let h = InHeader::parse(&hb[..40]);
        let mut op_in = [0u8; 128];
        op_in.copy_from_slice(&hb[abi::OP_IN..abi::OP_IN + 128]);
        (h, op_in, &entry.payload()[..len])
    };
    let fs = &entry.shared.fs;
    let r = Reply::new(entry.clone(), h.unique);
    let f = Fields(&op_in);
    let who = Who {
        uid: h.uid,
        gid: h.gid,
        pid: h.pid,
    };
    let ino = h.nodeid;
    // The request's names, or EINVAL if the payload lacks them.
    macro_rules! names_or_einval {
        () => {
            match abi::names(payload) {
                Some(v) => v,
                None => return r.fail(libc::EINVAL),
            }
        };
    }
    match h.opcode {
        op::LOOKUP => {
            let [n] = names_or_einval!();
            fs.lookup_op(ino, n, r)
        }
        op::GETATTR => {
            let fh = (f.u32(0) & abi::GETATTR_FH != 0).then(|| f.u64(8));
            fs.getattr_op(ino, fh, r)
        }
        op::SETATTR => fs.setattr_op(who, ino, abi::setattr(&op_in), r),
        op::READLINK => fs.readlink_op(ino, r.limit(usize::MAX)),
        op::SYMLINK => {
            let [n, target] = names_or_einval!();
            fs.symlink_op(who, ino, n, target, r)
        }
        op::MKNOD => {
            let [n] = names_or_einval!();
            fs.mknod_op(who, ino, n, f.u32(0), f.u32(8), f.u32(4), r)
        }
        op::MKDIR => {
            let [n] = names_or_einval!();
            fs.mkdir_op(who, ino, n, f.u32(0), f.u32(4), r)
        }
        op::UNLINK | op::RMDIR => {
            let [n] = names_or_einval!();
            fs.unlink_op(ino, n, h.opcode == op::RMDIR, r)
        }
        op::RENAME | op::RENAME2 => {
            let [from, to] = names_or_einval!();
            let flags = if h.opcode == op::RENAME2 { f.u32(8) } else { 0 };
            fs.rename_op(ino, from, f.u64(0), to, flags, r)
        }
        op::LINK => {
            let [n] = names_or_einval!();
            fs.link_op(f.u64(0), ino, n, r)
        }
        op::OPEN => fs.open_op(ino, f.u32(0) as i32, r),
        op::READ => {
            let size = f.u32(16);
            fs.read_op(f.u64(0), f.u64(8), size, r.limit(size as usize))
        }
        op::WRITE => {
            let size = (f.u32(16) as usize).min(payload.len());
            let kill = f.u32(20) & abi::WRITE_KILL_SUIDGID != 0;
            fs.write_op(f.u64(0), f.u64(8), PooledBuf::copy_of(&payload[..size]), kill, r)
        }
        op::STATFS => fs.statfs_op(r),
        op::RELEASE => fs.release_op(f.u64(0), r),
        op::FSYNC => fs.fsync_op(f.u64(0), f.u32(8) & abi::FSYNC_FDATASYNC != 0, r),
        op::SETXATTR => {
            // Without FUSE_SETXATTR_EXT: { size, flags }, then name, value.
            let [n] = names_or_einval!();
            let size = f.u32(0) as usize;
            let value = abi::after_names(payload, 1).unwrap_or_default();
            let value = value[..size.min(value.len())].to_vec();
            fs.setxattr_op(ino, n, value, f.u32(4) as i32, r)
        }
        op::GETXATTR => {
            let [n] = names_or_einval!();
            let size = f.u32(0);
            fs.getxattr_op(ino, n, size, r.limit(size as usize))
        }
        op::LISTXATTR => {
            let size = f.u32(0);
            fs.listxattr_op(ino, size, r.limit(size as usize))
        }
        op::REMOVEXATTR => {
            let [n] = names_or_einval!();
            fs.removexattr_op(ino, n, r)
        }
        op::FLUSH => fs.flush_op(f.u64(0), r),
        op::OPENDIR => fs.opendir_op(ino, r),
        op::READDIR => {
            let size = f.u32(16) as usize;
            fs.readdir_op(f.u64(0), f.u64(8), r.limit(size))
        }
        op::READDIRPLUS => {
            let size = f.u32(16) as usize;
            fs.readdirplus_op(f.u64(0), f.u64(8), r.limit(size))
        }
        op::RELEASEDIR => fs.releasedir_op(f.u64(0), r),
        op::FSYNCDIR => fs.fsyncdir_op(ino, f.u32(8) & abi::FSYNC_FDATASYNC != 0, r),
        op::ACCESS => fs.access_op(ino, r),
        op::CREATE => {
            let [n] = names_or_einval!();
            fs.create_op(who, ino, n, f.u32(4), f.u32(8), f.u32(0) as i32, r)
        }
        op::FALLOCATE => fs.fallocate_op(f.u64(0), f.u64(8), f.u64(16), f.u32(24) as i32, r),
        op::LSEEK => fs.lseek_op(f.u64(0), f.u64(8) as i64, f.u32(16) as i32, r),
        op::COPY_FILE_RANGE => {
            fs.copy_file_range_op(f.u64(0), f.u64(8), f.u64(24), f.u64(32), f.u64(40), f.u64(48) as u32, r)
        }
        op::DESTROY => {
            reply::Empty::ok(r);
            true
        }
        _ => r.fail(libc::ENOSYS),
    }
}

/// The answer to the request in an entry: written into the entry's
/// buffers, then committed by the thread serving the entry, or, from a
/// rescuer, by a new thread that takes the entry over.
pub struct Reply {
    entry: Arc<Entry>,
    unique: u64,
    /// The most the request takes back (READ, READDIR, xattr sizes).
    limit: usize,
    /// Bytes of the body written so far (directory listings).
    len: usize,
}

impl Reply {
    fn new(entry: Arc<Entry>, unique: u64) -> Reply {
        let limit = entry.shared.payload_len;
        Reply {
            entry,
            unique,
            limit,
            len: 0,
        }
    }

    fn limit(mut self, n: usize) -> Reply {
        self.limit = n.min(self.entry.shared.payload_len);
        self
    }

    /// Writes to the body from where it stands.
    fn body<T>(&mut self, f: impl FnOnce(&mut Body) -> T) -> T {
        // SAFETY: the one answering owns the entry's buffers.
        let buf = unsafe { &mut self.entry.payload()[..self.limit] };
        let mut b = Body { buf, len: self.len };
        let r = f(&mut b);
        self.len = b.len;
        r
    }

    fn fail(self, errno: i32) -> bool {
        self.send(errno);
        true
    }

    /// Writes the out header and the body's length, and has the answer
    /// committed.
    fn send(self, errno: i32) {
        let body = if errno == 0 { self.len } else { 0 };
        // SAFETY: the one answering owns the entry's buffers.
        let h = unsafe { self.entry.header() };
        h[0..4].copy_from_slice(&((16 + body) as u32).to_le_bytes());
        h[4..8].copy_from_slice(&(-errno).to_le_bytes());
        h[8..16].copy_from_slice(&self.unique.to_le_bytes());
        let at = abi::ENT_IN_OUT + 16;
        h[at..at + 4].copy_from_slice(&(body as u32).to_le_bytes());
        if inline::rescuing() {
            // The thread that took the request is stuck in a hung side: a
            // new one commits this answer and serves the entry from now on.
            let entry = self.entry.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("ring-{}.r", entry.qid))
                .spawn(move || serve(entry, abi::CMD_COMMIT_AND_FETCH, None));
            if let Err(e) = spawned {
                log::error!("cannot start a ring thread for a rescued request: {e}");
            }
        }
    }

    fn ok_with(mut self, f: impl FnOnce(&mut Body)) {
        self.body(f);
        self.send(0)
    }
}

impl reply::Fail for Reply {
    fn error(self, e: Errno) {
        self.send(e.code())
    }
}

impl reply::Entry for Reply {
    fn entry(self, a: &FileAttr) {
        self.ok_with(|b| abi::entry_out(b, a, TTL))
    }

    fn negative(self) {
        self.ok_with(|b| abi::entry_out(b, &reply::negative_attr(), TTL))
    }
}

impl reply::Attr for Reply {
    fn attr(self, a: &FileAttr) {
        self.ok_with(|b| abi::attr_out(b, a, TTL))
    }
}

impl reply::Data for Reply {
    fn data(self, d: &[u8]) {
        let n = d.len().min(self.limit);
        self.ok_with(|b| b.bytes(&d[..n]))
    }
}

impl reply::Empty for Reply {
    fn ok(self) {
        self.send(0)
    }
}

impl reply::Open for Reply {
    fn opened(self, fh: u64, flags: FopenFlags) {
        self.ok_with(|b| abi::open_out(b, fh, flags.bits()))
    }
}

impl reply::Written for Reply {
    fn written(self, n: u32) {
        self.ok_with(|b| {
            b.u32(n);
            b.u32(0)
        })
    }
}

impl reply::Create for Reply {
    fn created(self, a: &FileAttr, fh: u64, flags: FopenFlags) {
        self.ok_with(|b| {
            abi::entry_out(b, a, TTL);
            abi::open_out(b, fh, flags.bits())
        })
    }
}

impl reply::Lseek for Reply {
    fn offset(self, o: i64) {
        self.ok_with(|b| b.u64(o as u64))
    }
}

impl reply::StatfsReply for Reply {
    fn statfs(self, s: &reply::Statfs) {
        self.ok_with(|b| {
            for v in [s.blocks, s.bfree, s.bavail, s.files, s.ffree] {
                b.u64(v);
            }
            for v in [s.bsize, s.namelen, s.frsize, 0] {
                b.u32(v);
            }
            b.zeros(24);
        })
    }
}

impl reply::Xattr for Reply {
    fn size(self, n: u32) {
        // A size query's answer is a `fuse_getxattr_out`, whatever the limit.
        let mut r = self;
        r.limit = r.entry.shared.payload_len;
        r.ok_with(|b| {
            b.u32(n);
            b.u32(0)
        })
    }

    fn value(self, d: &[u8]) {
        if d.len() > self.limit {
            return self.send(libc::ERANGE);
        }
        self.ok_with(|b| b.bytes(d))
    }
}

impl reply::Dir for Reply {
    fn add(&mut self, ino: u64, offset: u64, kind: FileType, name: &std::ffi::OsStr) -> bool {
        !self.body(|b| abi::dirent(b, ino, offset, kind, name))
    }

    fn done(self) {
        self.send(0)
    }
}

impl reply::DirPlus for Reply {
    fn add(&mut self, offset: u64, name: &std::ffi::OsStr, a: &FileAttr) -> bool {
        !self.body(|b| abi::direntplus(b, offset, name, a, TTL))
    }

    fn done(self) {
        self.send(0)
    }
}
