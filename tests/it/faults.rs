//! Real kernel faults for one side of a pair, and self-tests (no mirrorfs
//! involved) that prove each fault happens.
//!
//! Each fixture mounts a small filesystem of its own on a directory it owns.
//! `side()` is a directory inside it to use as PRIMARY or MIRROR, so that the
//! filesystem's own litter (ext4's `lost+found`, the zram heal probe) stays
//! out of the pair. Dropping a fixture undoes everything it did: it ends the
//! fault, unmounts (lazily if it must), detaches the zram or loop device and
//! stops the processes it started. Declare a fixture before the mirrorfs
//! mount that uses it, so that the mount is dropped first.
//!
//! What a process using the faulty filesystem sees, measured on Linux 6.18:
//!
//! | fault | errno | when |
//! |---|---|---|
//! | `Zram::fail`, `ZramMount::Sync` | EIO | at once, on every change: write, create, mkdir, unlink, also through descriptors opened before. Reads of data already there go on working. `heal()` ends it. |
//! | `Zram::fail`, `ZramMount::Async` | EIO | only on fsync, fdatasync, syncfs and O_DIRECT writes. Buffered writes and metadata changes succeed into the page cache and fail later, unseen, at writeback. |
//! | `SmallTmpfs`, full | ENOSPC | on the write() that does not fit |
//! | `ReadOnly::remount_ro` | EROFS | on opens for writing and on changes. The kernel refuses the remount (EBUSY) while any file on it is open for writing, so it only works on an idle filesystem. `remount_rw()` ends it. |
//! | `ReadOnly::force_ro` | EROFS | at once, on every change, including writes through descriptors opened before: an ext4 error with `errors=remount-ro`, as after a disk error. Works with writers open. Cannot be healed. |
//! | `XfsShutdown::shutdown` | EIO | at once, on everything: stat of the root, reads, writes. Cannot be healed. |
//! | `Sshfs::kill` | ENOTCONN | at once, on everything (the FUSE connection is gone) |
//! | `Sshfs::hang` | none | every request that reaches sshfs waits until `resume()`; only a fatal signal ends the wait |

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::common::{fuse_available, is_mounted, noise, ok, open_tempdir, root_available, run};

// ---------------------------------------------------------------- shared

/// Creates `<root>/side` (mode 0755) and returns it.
fn make_side(root: &Path) -> PathBuf {
    let side = root.join("side");
    fs::create_dir_all(&side).unwrap_or_else(|e| panic!("mkdir {}: {e}", side.display()));
    fs::set_permissions(&side, fs::Permissions::from_mode(0o755)).expect("chmod side");
    side
}

/// Unmounts `path`, retrying while it is busy for up to 5 s, then lazily.
fn unmount(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while is_mounted(path) {
        let done = Command::new("umount")
            .arg(path)
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if done {
            return;
        }
        if Instant::now() > deadline {
            eprintln!(
                "faults: {} still busy after 5 s: detaching it (umount -l)",
                path.display()
            );
            let _ = Command::new("umount").arg("-l").arg(path).status();
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Panics with a pointer to .ci/install.sh if a tool is missing.
fn need_tool(name: &str) -> PathBuf {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found (see .ci/install.sh)"))
}

/// Creates `path`, writes `data` and fsyncs it: the first error, if any.
pub fn write_synced(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// All descendants of `pid` (children of each of its threads, recursively).
pub(crate) fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let children = fs::read_to_string(t.path().join("children")).unwrap_or_default();
        for c in children.split_whitespace().filter_map(|c| c.parse::<i32>().ok()) {
            out.push(c);
            out.extend(descendants(c));
        }
    }
    out
}

pub(crate) fn alive(pid: i32) -> bool {
    // A zombie has finished; it is its parent's to reap.
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .map(|r| !r.trim_start().starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

/// Waits up to `limit` for a child to exit, then kills it; reaps it either way.
fn end_child(c: &mut Child, limit: Duration) {
    let deadline = Instant::now() + limit;
    while c.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = c.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.wait();
}

// ---------------------------------------------------------------- zram

const ZRAM_CONTROL: &str = "/sys/class/zram-control";

/// How the ext4 on a `Zram` is mounted, which decides when a writer sees
/// the EIO that `fail()` causes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZramMount {
    /// `-o sync`: every change is written through at once, so the write,
    /// create, mkdir or unlink itself returns EIO. The choice for failover
    /// tests: nothing is hidden in the page cache.
    Sync,
    /// Ordinary writeback: only fsync, syncfs and O_DIRECT writes return EIO.
    Async,
}

/// A healable EIO: ext4 on a zram device whose memory limit `fail()` drops
/// below what it already uses, so that every write that needs new memory
/// fails in the block layer with EIO; `heal()` lifts the limit.
///
/// - The ext4 has no journal: a failed journal commit would abort the
///   journal and turn the whole filesystem read-only (EROFS, for good) about
///   5 s after `fail()`. Without one, `errors=continue` keeps it read-write,
///   returning EIO, for as long as the fault lasts.
/// - Inode tables are initialised by mkfs, so no background writer
///   (ext4lazyinit) touches the device.
/// - zram keeps a page of one repeated 8-byte word without memory, so such a
///   page is still written after `fail()`: write `noise()`.
/// - After `heal()`, ext4 may report one stale error from writebacks that
///   failed before; `heal()` consumes it with a probe outside `side()`.
pub struct Zram {
    dev: u32,
    root: PathBuf,
    mounted: bool,
    _dir: TempDir,
}

impl Zram {
    /// A new zram device of `size` (e.g. "256M") with ext4 mounted as `mode`.
    pub fn new(size: &str, mode: ZramMount) -> Zram {
        need_tool("mkfs.ext4");
        let dir = open_tempdir();
        let root = dir.path().join("fs");
        fs::create_dir(&root).expect("zram mountpoint");
        let n = fs::read_to_string(format!("{ZRAM_CONTROL}/hot_add"))
            .unwrap_or_else(|e| panic!("{ZRAM_CONTROL}/hot_add: {e} (zram must be in the kernel)"));
        let dev = n.trim().parse().unwrap_or_else(|_| panic!("zram hot_add said {n:?}"));
        let mut z = Zram {
            dev,
            root,
            mounted: false,
            _dir: dir,
        };
        z.set("disksize", size);
        let node = z.devnode();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !node.exists() {
            assert!(Instant::now() < deadline, "{} did not appear", node.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        ok(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-O", "^has_journal"])
            .args(["-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard"])
            .arg(&node));
        let opts = match mode {
            ZramMount::Sync => "errors=continue,sync",
            ZramMount::Async => "errors=continue",
        };
        ok(Command::new("mount").args(["-o", opts]).arg(&node).arg(&z.root));
        z.mounted = true;
        make_side(&z.root);
        z
    }

    pub fn devnode(&self) -> PathBuf {
        PathBuf::from(format!("/dev/zram{}", self.dev))
    }

    /// The directory to use as a side.
    pub fn side(&self) -> PathBuf {
        self.root.join("side")
    }

    fn sysfs(&self, attr: &str) -> PathBuf {
        PathBuf::from(format!("/sys/block/zram{}/{attr}", self.dev))
    }

    fn set(&self, attr: &str, value: &str) {
        let p = self.sysfs(attr);
        fs::write(&p, value).unwrap_or_else(|e| panic!("echo {value} > {}: {e}", p.display()));
    }

    /// Memory the device uses now (mm_stat's mem_used_total), in bytes.
    pub fn mem_used(&self) -> u64 {
        let s = fs::read_to_string(self.sysfs("mm_stat")).expect("mm_stat");
        s.split_whitespace()
            .nth(2)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("mm_stat: {s:?}"))
    }

    /// From now on every write to the device that needs memory fails with
    /// EIO. The limit is one page, below what the device already uses: a
    /// limit at the current use would still let writes that fit into
    /// partly used zsmalloc pages through.
    pub fn fail(&self) {
        self.set("mem_limit", "4096");
    }

    /// Ends the fault. Returns once a create, write and fsync on the
    /// filesystem succeed again (outside `side()`).
    pub fn heal(&self) {
        self.set("mem_limit", "0");
        let probe = self.root.join(".heal-probe");
        let mut last = None;
        for i in 0..50 {
            let r = write_synced(&probe, &noise(8192, i)).and_then(|_| {
                let d = File::open(&self.root)?;
                nix::unistd::syncfs(&d).map_err(io::Error::from)
            });
            match r {
                Ok(()) => {
                    let _ = fs::remove_file(&probe);
                    return;
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("zram{} still failing after heal: {last:?}", self.dev);
    }
}

impl Drop for Zram {
    fn drop(&mut self) {
        let _ = fs::write(self.sysfs("mem_limit"), "0");
        if self.mounted {
            unmount(&self.root);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match fs::write(format!("{ZRAM_CONTROL}/hot_remove"), self.dev.to_string()) {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => {
                    eprintln!(
                        "\n!!!!!!!! faults: cannot remove zram{}: {e} -- LEFT BEHIND !!!!!!!!\n",
                        self.dev
                    );
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

// ---------------------------------------------------------------- tmpfs

/// ENOSPC: a tmpfs of a given size.
pub struct SmallTmpfs {
    root: PathBuf,
    mounted: bool,
    _dir: TempDir,
}

impl SmallTmpfs {
    /// A tmpfs of `size` (e.g. "2m").
    pub fn new(size: &str) -> SmallTmpfs {
        let dir = open_tempdir();
        let root = dir.path().join("fs");
        fs::create_dir(&root).expect("tmpfs mountpoint");
        let mut t = SmallTmpfs {
            root,
            mounted: false,
            _dir: dir,
        };
        ok(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"])
            .arg(&t.root));
        t.mounted = true;
        make_side(&t.root);
        t
    }

    pub fn side(&self) -> PathBuf {
        self.root.join("side")
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        if self.mounted {
            unmount(&self.root);
        }
    }
}

// ---------------------------------------------------------------- loop images

/// A filesystem image on a loop device, mounted on a directory of its own.
struct LoopFs {
    root: PathBuf,
    loopdev: Option<String>,
    mounted: bool,
    dir: TempDir,
}

impl LoopFs {
    /// A sparse image of `size` bytes, formatted by `mkfs` (program and
    /// arguments; the image path is appended), mounted with `opts`.
    fn new(size: u64, mkfs: &[&str], opts: &str) -> LoopFs {
        need_tool(mkfs[0]);
        need_tool("losetup");
        let dir = open_tempdir();
        let img = dir.path().join("fs.img");
        let root = dir.path().join("fs");
        fs::create_dir(&root).expect("mountpoint");
        File::create(&img).and_then(|f| f.set_len(size)).expect("image");
        ok(Command::new(mkfs[0]).args(&mkfs[1..]).arg(&img));
        let mut l = LoopFs {
            root,
            loopdev: None,
            mounted: false,
            dir,
        };
        let out = ok(Command::new("losetup").args(["-f", "--show"]).arg(&img));
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup said {dev:?}");
        l.loopdev = Some(dev.clone());
        let mut mount = Command::new("mount");
        if !opts.is_empty() {
            mount.args(["-o", opts]);
        }
        ok(mount.arg(&dev).arg(&l.root));
        l.mounted = true;
        make_side(&l.root);
        l
    }

    /// `loop3` for /dev/loop3.
    fn devname(&self) -> &str {
        self.loopdev
            .as_deref()
            .and_then(|d| d.strip_prefix("/dev/"))
            .expect("loop device")
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.mounted {
            unmount(&self.root);
        }
        if let Some(dev) = self.loopdev.take() {
            // After a lazy unmount the device stays busy until the last user
            // lets go; autoclear then detaches it.
            let detached = (0..50).any(|_| {
                let done = Command::new("losetup")
                    .arg("-d")
                    .arg(&dev)
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                if !done {
                    std::thread::sleep(Duration::from_millis(100));
                }
                done
            });
            if !detached {
                eprintln!(
                    "\n!!!!!!!! faults: cannot detach {dev} ({}) -- LEFT BEHIND !!!!!!!!\n",
                    self.dir.path().display()
                );
            }
        }
    }
}

/// EROFS: ext4 on a loop device, mounted with `errors=remount-ro`.
pub struct ReadOnly {
    fs: LoopFs,
}

impl ReadOnly {
    /// A 64 MiB ext4 (with a journal, as usual).
    pub fn new() -> ReadOnly {
        ReadOnly {
            fs: LoopFs::new(
                64 << 20,
                &["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"],
                "errors=remount-ro",
            ),
        }
    }

    pub fn side(&self) -> PathBuf {
        self.fs.root.join("side")
    }

    /// `mount -o remount,ro`: the operator's way. The kernel refuses it
    /// (EBUSY) while any file on the filesystem is open for writing, so a
    /// mirrorfs that holds a file open for writing on this side blocks it;
    /// returns the error output then.
    pub fn remount_ro(&self) -> Result<(), String> {
        let out = run(Command::new("mount").args(["-o", "remount,ro"]).arg(&self.fs.root));
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Ends `remount_ro`.
    pub fn remount_rw(&self) {
        ok(Command::new("mount").args(["-o", "remount,rw"]).arg(&self.fs.root));
    }

    /// Turns the filesystem read-only at once, with writers open: an ext4
    /// error (the sysfs `trigger_fs_error` knob) under `errors=remount-ro`,
    /// what ext4 does after a disk error. It aborts the journal, so it
    /// cannot be undone short of unmounting.
    pub fn force_ro(&self) {
        let knob = format!("/sys/fs/ext4/{}/trigger_fs_error", self.fs.devname());
        fs::write(&knob, "mirrorfs fault test").unwrap_or_else(|e| panic!("{knob}: {e}"));
    }
}

/// EIO on everything: xfs on a loop device, shut down by `xfs_io`.
pub struct XfsShutdown {
    fs: LoopFs,
}

impl XfsShutdown {
    /// A 300 MiB xfs (the smallest mkfs.xfs makes).
    pub fn new() -> XfsShutdown {
        need_tool("xfs_io");
        XfsShutdown {
            fs: LoopFs::new(300 << 20, &["mkfs.xfs", "-q", "-f"], ""),
        }
    }

    pub fn root(&self) -> &Path {
        &self.fs.root
    }

    pub fn side(&self) -> PathBuf {
        self.fs.root.join("side")
    }

    /// `xfs_io -x -c 'shutdown -f'`: from now on every access returns EIO.
    pub fn shutdown(&self) {
        ok(Command::new("xfs_io")
            .args(["-x", "-c", "shutdown -f"])
            .arg(&self.fs.root));
    }
}

// ---------------------------------------------------------------- sshfs

/// A TCP relay on a free local port to `to`, that holds each chunk `delay`
/// before passing it on, each way, without limiting the rate (chunks queue
/// with their arrival time). Its threads end with the connections; the
/// listener lives as long as the test process.
fn relay(to: u16, delay: Duration) -> u16 {
    use std::net::{Shutdown, TcpListener};
    use std::sync::mpsc;
    let listener = TcpListener::bind("127.0.0.1:0").expect("relay port");
    let port = listener.local_addr().expect("relay address").port();
    let pipe = move |mut from: TcpStream, mut into: TcpStream| {
        let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        std::thread::spawn(move || {
            for (due, chunk) in rx {
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                if into.write_all(&chunk).is_err() {
                    break;
                }
            }
            let _ = into.shutdown(Shutdown::Write);
        });
    };
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (c2, s2) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
            pipe(client, s2);
            pipe(server, c2);
        }
    });
    port
}

/// A network side over loopback: a private sshd on 127.0.0.1 (its own host
/// key, config and authorized key, started as a child) and an sshfs of
/// `remote()` mounted on `root()`.
///
/// sshfs runs with `allow_other` (so that the side answers every uid, not
/// only root), without its directory cache and with zero kernel entry and
/// attribute timeouts (so that every access reaches sshfs, and a hang is a
/// hang at once), without `reconnect` (a dead sshfs stays dead) and without
/// `ServerAliveInterval` (a hang never turns into an error by itself).
pub struct Sshfs {
    dir: TempDir,
    root: PathBuf,
    remote: PathBuf,
    sshd: Option<Child>,
    sshfs: Arc<Mutex<SshfsProc>>,
}

struct SshfsProc {
    child: Option<Child>,
    /// Processes it started (ssh), to be sure they end with it.
    helpers: Vec<i32>,
}

impl SshfsProc {
    /// The pid of sshfs while it runs (not yet reaped).
    fn pid(&mut self) -> Option<Pid> {
        let c = self.child.as_mut()?;
        match c.try_wait() {
            Ok(None) => Some(Pid::from_raw(c.id() as i32)),
            _ => None,
        }
    }

    fn signal(&mut self, sig: Signal) {
        let pid = self.pid().expect("sshfs is not running");
        kill(pid, sig).unwrap_or_else(|e| panic!("kill -{sig} sshfs: {e}"));
    }
}

/// Sends SIGCONT to a stopped sshfs when dropped, so that a test that
/// panics with sshfs stopped does not leave the mount using it hanging.
/// Declare it after the mirrorfs mount, so that it is dropped first.
pub struct ResumeOnDrop(Arc<Mutex<SshfsProc>>);

impl Drop for ResumeOnDrop {
    fn drop(&mut self) {
        let mut p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pid) = p.pid() {
            let _ = kill(pid, Signal::SIGCONT);
        }
    }
}

impl Sshfs {
    pub fn new() -> Sshfs {
        Sshfs::with_delay(None)
    }

    /// An sshfs whose link to sshd passes through `relay`, which holds
    /// every chunk `delay` each way (a distant mirror: this kernel has no
    /// netem).
    pub fn with_delay(delay: Option<Duration>) -> Sshfs {
        let sshd_bin = need_tool("sshd");
        need_tool("sshfs");
        need_tool("ssh-keygen");
        // sshd's privilege separation directory (Debian's service creates it).
        fs::create_dir_all("/run/sshd").expect("mkdir /run/sshd");
        let dir = open_tempdir();
        let d = dir.path().to_path_buf();
        let (root, remote) = (d.join("fs"), d.join("remote"));
        fs::create_dir(&root).expect("sshfs mountpoint");
        fs::create_dir(&remote).expect("sshfs remote directory");
        make_side(&remote);
        for key in ["host_key", "client_key"] {
            ok(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "mirrorfs-test", "-f"])
                .arg(d.join(key)));
        }
        fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).expect("authorized_keys");
        let mut s = Sshfs {
            dir,
            root,
            remote,
            sshd: None,
            sshfs: Arc::new(Mutex::new(SshfsProc {
                child: None,
                helpers: Vec::new(),
            })),
        };
        let sshd_port = s.start_sshd(&sshd_bin);
        let port = match delay {
            Some(d) => relay(sshd_port, d),
            None => sshd_port,
        };

        let log = File::create(d.join("sshfs.log")).expect("sshfs log");
        let opts = format!(
            "StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes,IdentitiesOnly=yes,\
             IdentityFile={},port={port},LogLevel=ERROR,allow_other,dir_cache=no,\
             entry_timeout=0,attr_timeout=0,negative_timeout=0",
            d.join("client_key").display()
        );
        let child = Command::new("sshfs")
            .args(["-f", "-F", "/dev/null", "-o", &opts])
            .arg(format!("root@127.0.0.1:{}", s.remote.display()))
            .arg(&s.root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn sshfs");
        s.sshfs.lock().unwrap().child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(&s.root) {
            let gone = s.sshfs.lock().unwrap().pid().is_none();
            if gone || Instant::now() > deadline {
                let log = fs::read_to_string(d.join("sshfs.log")).unwrap_or_default();
                panic!("sshfs did not mount (exited: {gone}):\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    /// Starts sshd on a free port (retrying if another process took the
    /// port first) and returns the port once sshd accepts connections.
    fn start_sshd(&mut self, sshd_bin: &Path) -> u16 {
        let d = self.dir.path();
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let config = format!(
                "ListenAddress 127.0.0.1\nPort {port}\nHostKey {d}/host_key\n\
                 AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n\
                 PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 UsePAM no\nStrictModes no\nPidFile none\nSubsystem sftp internal-sftp\nLogLevel ERROR\n",
                d = d.display()
            );
            fs::write(d.join("sshd_config"), config).expect("sshd_config");
            let log = File::create(d.join("sshd.log")).expect("sshd log");
            // sshd must be started by its absolute path to re-exec itself.
            let child = Command::new(sshd_bin)
                .args(["-D", "-e", "-f"])
                .arg(d.join("sshd_config"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("spawn sshd");
            self.sshd = Some(child);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return port;
                }
                let exited = self.sshd.as_mut().and_then(|c| c.try_wait().ok().flatten());
                if exited.is_some() || Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Some(mut c) = self.sshd.take() {
                end_child(&mut c, Duration::ZERO);
            }
            let log = fs::read_to_string(d.join("sshd.log")).unwrap_or_default();
            if !log.contains("Address already in use") {
                panic!("sshd did not start:\n{log}");
            }
        }
        panic!("sshd: no free port after 5 tries");
    }

    /// The sshfs mountpoint.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory to use as a side (through sshfs).
    pub fn side(&self) -> PathBuf {
        self.root.join("side")
    }

    /// The directory sshd serves: `side()` as the server sees it.
    pub fn remote_side(&self) -> PathBuf {
        self.remote.join("side")
    }

    /// Kills sshfs (SIGKILL): from now on every access returns ENOTCONN.
    pub fn kill(&self) {
        let mut p = self.sshfs.lock().unwrap();
        let pid = p.pid().expect("sshfs is not running");
        let helpers = descendants(pid.as_raw());
        p.helpers.extend(helpers);
        let _ = kill(pid, Signal::SIGCONT);
        p.signal(Signal::SIGKILL);
        if let Some(c) = p.child.as_mut() {
            let _ = c.wait();
        }
    }

    /// Stops sshfs (SIGSTOP): every access that reaches it waits.
    pub fn hang(&self) {
        self.sshfs.lock().unwrap().signal(Signal::SIGSTOP);
    }

    /// Ends `hang`.
    pub fn resume(&self) {
        self.sshfs.lock().unwrap().signal(Signal::SIGCONT);
    }

    /// A guard that resumes sshfs when dropped; see `ResumeOnDrop`.
    pub fn resume_on_drop(&self) -> ResumeOnDrop {
        ResumeOnDrop(Arc::clone(&self.sshfs))
    }
}

impl Drop for Sshfs {
    fn drop(&mut self) {
        let mut p = self.sshfs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pid) = p.pid() {
            let helpers = descendants(pid.as_raw());
            p.helpers.extend(helpers);
            let _ = kill(pid, Signal::SIGCONT);
        }
        // A plain unmount ends a live sshfs by itself.
        unmount(&self.root);
        if let Some(c) = p.child.as_mut() {
            end_child(c, Duration::from_secs(5));
        }
        if is_mounted(&self.root) {
            let _ = Command::new("umount").arg("-l").arg(&self.root).status();
        }
        if let Some(mut c) = self.sshd.take() {
            let sessions = descendants(c.id() as i32);
            p.helpers.extend(sessions);
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            end_child(&mut c, Duration::from_secs(5));
        }
        // ssh and the sshd sessions end when their connection closes.
        let deadline = Instant::now() + Duration::from_secs(3);
        while p.helpers.iter().any(|&h| alive(h)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for &h in p.helpers.iter().filter(|&&h| alive(h)) {
            let _ = kill(Pid::from_raw(h), Signal::SIGKILL);
        }
    }
}

// ---------------------------------------------------------------- self-tests

/// Compares bytes without printing them all: length and first difference.
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let at = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: {} bytes, expected {}; first difference at byte {at}",
            got.len(),
            want.len()
        );
    }
}

fn assert_errno<T: std::fmt::Debug>(r: io::Result<T>, want: i32, what: &str) {
    match r {
        Err(e) if e.raw_os_error() == Some(want) => {}
        other => panic!("{what}: expected {}, got {other:?}", io::Error::from_raw_os_error(want)),
    }
}

#[test]
fn zram_sync_fail_gives_eio_on_every_change_and_heal_ends_it() {
    if !root_available("zram_sync_fail_gives_eio_on_every_change_and_heal_ends_it") {
        return;
    }
    let z = Zram::new("64M", ZramMount::Sync);
    let side = z.side();
    let before = noise(256 << 10, 1);
    write_synced(&side.join("before"), &before).expect("write before fail");
    let mut held = OpenOptions::new().append(true).open(side.join("before")).unwrap();

    let used = z.mem_used();
    z.fail();
    assert_errno(
        write_synced(&side.join("new"), &noise(64 << 10, 2)),
        libc::EIO,
        "create+write+fsync after fail",
    );
    assert_errno(
        held.write_all(&noise(64 << 10, 3)),
        libc::EIO,
        "write on an fd opened before",
    );
    assert_errno(fs::create_dir(side.join("d")), libc::EIO, "mkdir after fail");
    // The failed append still went into the page cache: reads see it.
    let now = fs::read(side.join("before")).expect("reads go on working");
    assert_same(&now[..before.len()], &before, "data written before fail");
    assert!(
        z.mem_used() <= used + (64 << 10),
        "failed writes took memory: {used} -> {}",
        z.mem_used()
    );

    z.heal();
    write_synced(&side.join("after"), &noise(256 << 10, 4)).expect("write after heal");
    held.write_all(&noise(4096, 5)).expect("write on the old fd after heal");
    held.sync_all().expect("fsync on the old fd after heal");
    fs::create_dir(side.join("d2")).expect("mkdir after heal");
    assert_same(
        &fs::read(side.join("after")).unwrap(),
        &noise(256 << 10, 4),
        "after heal",
    );
}

/// Allocates `len` bytes aligned for O_DIRECT.
fn aligned(len: usize, seed: u64) -> (Vec<u8>, usize) {
    let mut v = vec![0u8; len + 4096];
    let off = v.as_ptr().align_offset(4096);
    v[off..off + len].copy_from_slice(&noise(len, seed));
    (v, off)
}

#[test]
fn zram_async_fail_shows_only_on_fsync_and_o_direct() {
    if !root_available("zram_async_fail_shows_only_on_fsync_and_o_direct") {
        return;
    }
    let z = Zram::new("64M", ZramMount::Async);
    let side = z.side();
    z.fail();
    let mut f = File::create(side.join("buffered")).expect("create is cached");
    f.write_all(&noise(256 << 10, 1)).expect("buffered write is cached");
    assert_errno(f.sync_all(), libc::EIO, "fsync after fail");
    let (buf, off) = aligned(64 << 10, 2);
    let mut d = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(side.join("direct"))
        .unwrap();
    assert_errno(
        d.write_all(&buf[off..off + (64 << 10)]),
        libc::EIO,
        "O_DIRECT write after fail",
    );

    z.heal();
    write_synced(&side.join("after"), &noise(256 << 10, 3)).expect("write after heal");
    d.write_all(&buf[off..off + (64 << 10)])
        .expect("O_DIRECT write after heal");
}

#[test]
fn small_tmpfs_gives_enospc() {
    if !root_available("small_tmpfs_gives_enospc") {
        return;
    }
    let t = SmallTmpfs::new("1m");
    let mut f = File::create(t.side().join("big")).unwrap();
    assert_errno(f.write_all(&noise(2 << 20, 1)), libc::ENOSPC, "2 MiB into 1 MiB");
}

#[test]
fn remount_ro_gives_erofs_but_is_refused_while_a_file_is_open_for_writing() {
    if !root_available("remount_ro_gives_erofs_but_is_refused_while_a_file_is_open_for_writing") {
        return;
    }
    let r = ReadOnly::new();
    let side = r.side();
    write_synced(&side.join("kept"), b"kept").unwrap();
    let writer = OpenOptions::new().append(true).open(side.join("kept")).unwrap();
    let err = r.remount_ro().expect_err("remount ro with a writer open");
    assert!(err.contains("busy"), "{err}");
    drop(writer);
    r.remount_ro().expect("remount ro with no writer");
    assert_errno(File::create(side.join("new")), libc::EROFS, "create on ro");
    assert_errno(
        OpenOptions::new().append(true).open(side.join("kept")),
        libc::EROFS,
        "open for writing on ro",
    );
    assert_errno(fs::remove_file(side.join("kept")), libc::EROFS, "unlink on ro");
    assert_eq!(fs::read(side.join("kept")).unwrap(), b"kept");
    r.remount_rw();
    write_synced(&side.join("new"), b"new").expect("write after remount rw");
}

#[test]
fn forced_read_only_gives_erofs_with_writers_open() {
    if !root_available("forced_read_only_gives_erofs_with_writers_open") {
        return;
    }
    let r = ReadOnly::new();
    let side = r.side();
    write_synced(&side.join("kept"), b"kept").unwrap();
    let mut writer = OpenOptions::new().append(true).open(side.join("kept")).unwrap();
    r.force_ro();
    assert_errno(writer.write_all(b"more"), libc::EROFS, "write on an fd opened before");
    assert_errno(File::create(side.join("new")), libc::EROFS, "create");
    assert_errno(fs::create_dir(side.join("d")), libc::EROFS, "mkdir");
    assert_eq!(fs::read(side.join("kept")).unwrap(), b"kept", "reads go on working");
}

#[test]
fn xfs_shutdown_gives_eio_on_everything() {
    if !root_available("xfs_shutdown_gives_eio_on_everything") {
        return;
    }
    let x = XfsShutdown::new();
    let side = x.side();
    write_synced(&side.join("kept"), b"kept").unwrap();
    let mut writer = OpenOptions::new().append(true).open(side.join("kept")).unwrap();
    x.shutdown();
    assert_errno(fs::metadata(x.root()), libc::EIO, "stat of the root");
    assert_errno(fs::read(side.join("kept")), libc::EIO, "read");
    assert_errno(writer.write_all(b"more"), libc::EIO, "write on an fd opened before");
    assert_errno(File::create(side.join("new")), libc::EIO, "create");
}

#[test]
fn sshfs_serves_the_remote_directory_and_kill_gives_enotconn() {
    if !fuse_available("sshfs_serves_the_remote_directory_and_kill_gives_enotconn") {
        return;
    }
    let s = Sshfs::new();
    let side = s.side();
    write_synced(&side.join("kept"), b"kept").expect("write through sshfs");
    assert_eq!(fs::read(s.remote_side().join("kept")).unwrap(), b"kept");
    let mut writer = OpenOptions::new().append(true).open(side.join("kept")).unwrap();
    let mut reader = File::open(side.join("kept")).unwrap();
    s.kill();
    assert_errno(fs::metadata(side.join("kept")), libc::ENOTCONN, "stat");
    assert_errno(fs::metadata(s.root()), libc::ENOTCONN, "stat of the root");
    assert_errno(
        writer.write_all(b"more"),
        libc::ENOTCONN,
        "write on an fd opened before",
    );
    assert_errno(
        reader.read(&mut [0u8; 16]),
        libc::ENOTCONN,
        "read on an fd opened before",
    );
    assert_errno(File::create(side.join("new")), libc::ENOTCONN, "create");
}

#[test]
fn sshfs_hang_blocks_until_resumed() {
    if !fuse_available("sshfs_hang_blocks_until_resumed") {
        return;
    }
    let s = Sshfs::new();
    let _resume = s.resume_on_drop();
    let side = s.side();
    write_synced(&side.join("kept"), b"kept").expect("write through sshfs");
    let mut writer = OpenOptions::new().append(true).open(side.join("kept")).unwrap();
    s.hang();
    // Each helper says when it starts, then when its call returned.
    let (tx, rx) = std::sync::mpsc::channel();
    let p = side.join("kept");
    let stat = std::thread::spawn(move || {
        let _ = tx.send(None);
        let r = fs::metadata(&p).map(|m| m.len());
        let _ = tx.send(Some(Instant::now()));
        r
    });
    let (wtx, wrx) = std::sync::mpsc::channel();
    let write = std::thread::spawn(move || {
        let _ = wtx.send(None);
        let r = writer.write_all(b"more").and_then(|_| writer.sync_all());
        let _ = wtx.send(Some(Instant::now()));
        r
    });
    assert_eq!(rx.recv().unwrap(), None);
    assert_eq!(wrx.recv().unwrap(), None);
    assert!(
        rx.recv_timeout(Duration::from_secs(2)).is_err(),
        "stat answered while sshfs was stopped"
    );
    assert!(wrx.try_recv().is_err(), "write answered while sshfs was stopped");
    let resumed = Instant::now();
    s.resume();
    let answered = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("stat still hangs 10 s after resume")
        .expect("answer time");
    assert!(answered >= resumed);
    stat.join().unwrap().expect("stat after resume");
    wrx.recv_timeout(Duration::from_secs(10))
        .expect("write still hangs 10 s after resume");
    write.join().unwrap().expect("write after resume");
    assert_eq!(fs::read(s.remote_side().join("kept")).unwrap(), b"keptmore");
}
