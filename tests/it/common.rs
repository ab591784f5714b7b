//! Fixtures: a mounted pair (`Mounted`) and small command helpers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_mirrorfs");

/// True if FUSE tests can run here. Otherwise says so loudly, and under
/// CI=true fails the test instead of letting it pass as a skip.
pub fn fuse_available(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    let dev = Path::new("/dev/fuse").exists();
    if root && dev {
        return true;
    }
    let why = format!("{test}: CANNOT RUN: needs root ({root}) and /dev/fuse ({dev})");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{why} -- failing because CI=true");
    }
    eprintln!("\n!!!!!!!! {why} -- NOT TESTED !!!!!!!!\n");
    false
}

/// Runs a command and returns its output, panicking if it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command that must succeed.
pub fn ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A directory under /tmp that every user can reach (tempfile makes 0700).
pub fn open_tempdir() -> tempfile::TempDir {
    let t = tempfile::Builder::new()
        .prefix("mirrorfs-it.")
        .tempdir_in("/tmp")
        .expect("tempdir");
    std::fs::set_permissions(t.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    t
}

pub fn is_mounted(mnt: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(mnt.to_str().unwrap_or("")))
}

/// Unmounts a mount this test made in the background, detaching it if
/// `mirrorfs unmount` could not; returns the output of `mirrorfs unmount`.
pub fn unmount_or_detach(mnt: &Path) -> Output {
    let out = run(Command::new(BIN).arg("unmount").arg(mnt));
    if is_mounted(mnt) {
        let _ = Command::new("umount").arg("-l").arg(mnt).status();
    }
    out
}

/// True when the daemon `pid` answers `status` for `mnt`.
fn answers(mnt: &Path, pid: u64) -> bool {
    let out = run_within(
        Command::new(BIN).args(["status", "--json"]).arg(mnt),
        Duration::from_secs(10),
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v["pid"].as_u64())
        == Some(pid)
}

/// A mirrorfs mount over `<tmp>/primary|<tmp>/mirror` at `<tmp>/mnt`, served
/// by a foreground daemon that this fixture started and ends.
pub struct Mounted {
    pub dir: tempfile::TempDir,
    pub primary: PathBuf,
    pub mirror: PathBuf,
    pub mnt: PathBuf,
    child: Option<Child>,
    /// Filesystems mounted for this test (e.g. a small tmpfs side), unmounted last.
    extra_mounts: Vec<PathBuf>,
    /// Environment for the daemon, beyond the test's own.
    env: Vec<(&'static str, &'static str)>,
}

impl Mounted {
    /// Mounts with `-o create,<opts>`; None when FUSE tests cannot run here.
    pub fn new(test: &str, opts: &str) -> Option<Mounted> {
        Self::with_mirror_tmpfs(test, opts, None)
    }

    /// Like `new`, with the mirror on a tmpfs of `tmpfs_size` (e.g. "2m")
    /// when given: a real ENOSPC source.
    pub fn with_mirror_tmpfs(test: &str, opts: &str, tmpfs_size: Option<&str>) -> Option<Mounted> {
        Self::with_env(test, opts, tmpfs_size, Vec::new())
    }

    /// Like `with_mirror_tmpfs`, with `env` set for the daemon.
    pub fn with_env(
        test: &str,
        opts: &str,
        tmpfs_size: Option<&str>,
        env: Vec<(&'static str, &'static str)>,
    ) -> Option<Mounted> {
        if !fuse_available(test) {
            return None;
        }
        let dir = open_tempdir();
        let (primary, mirror, mnt) = (
            dir.path().join("primary"),
            dir.path().join("mirror"),
            dir.path().join("mnt"),
        );
        let mut m = Mounted {
            dir,
            primary,
            mirror,
            mnt,
            child: None,
            extra_mounts: Vec::new(),
            env,
        };
        if let Some(size) = tmpfs_size {
            std::fs::create_dir_all(&m.mirror).unwrap();
            ok(Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"])
                .arg(&m.mirror));
            m.extra_mounts.push(m.mirror.clone());
        }
        m.start(opts);
        Some(m)
    }

    /// Starts the daemon again on the same pair after `unmount`; returns
    /// the error output if it refuses.
    pub fn try_remount(&mut self, opts: &str) -> Result<(), String> {
        let spec = format!("{}|{}", self.primary.display(), self.mirror.display());
        let out = run(Command::new(BIN).args(["mount", "-o", opts, &spec]).arg(&self.mnt));
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn start(&mut self, opts: &str) {
        let o = if opts.is_empty() {
            "create".to_string()
        } else {
            format!("create,{opts}")
        };
        self.spawn(&o);
    }

    /// Starts `mirrorfs mount -f [-o opts]` on this pair and waits until the
    /// mount appears and its daemon answers status (the control socket is
    /// made a moment after the kernel's mount, as `mount` without -f
    /// waits for before it returns).
    fn spawn(&mut self, opts: &str) {
        let spec = format!("{}|{}", self.primary.display(), self.mirror.display());
        let child = self.mount_command(opts).spawn().expect("spawn mirrorfs");
        let pid = u64::from(child.id());
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(&self.mnt) || !answers(&self.mnt, pid) {
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                panic!("mirrorfs mount -f -o '{opts}' '{spec}' exited before mounting: {st}");
            }
            assert!(Instant::now() < deadline, "mount did not appear and answer within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `mirrorfs mount -f [-o opts] PRIMARY|MIRROR MOUNTPOINT` for this pair.
    fn mount_command(&self, opts: &str) -> Command {
        let spec = format!("{}|{}", self.primary.display(), self.mirror.display());
        let mut cmd = Command::new(BIN);
        cmd.args(["mount", "-f"]);
        if !opts.is_empty() {
            cmd.args(["-o", opts]);
        }
        cmd.arg(&spec)
            .arg(&self.mnt)
            .env("RUST_LOG", "warn")
            .envs(self.env.iter().copied())
            .stdin(Stdio::null());
        cmd
    }

    /// `kill -9` of the daemon and, at once, the same mount command again,
    /// as systemd's `Restart=on-failure` does, while the killed daemon may
    /// still be exiting. Returns how long until the new daemon answered
    /// status for the mount; panics if the new mount fails.
    pub fn kill9_and_restart(&mut self, opts: &str) -> Duration {
        let mut old = self.child.take().expect("a daemon to kill");
        let _ = old.kill(); // SIGKILL, not waited for
        let start = Instant::now();
        let mut new = self.mount_command(opts).spawn().expect("spawn mirrorfs");
        let deadline = start + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = new.try_wait() {
                let _ = old.wait();
                panic!("the mount right after kill -9 exited: {st} (its message is above)");
            }
            if answers(&self.mnt, u64::from(new.id())) {
                break;
            }
            if Instant::now() > deadline {
                let _ = new.kill();
                let _ = new.wait();
                let _ = old.wait();
                panic!("the mount right after kill -9 did not answer status within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let took = start.elapsed();
        let _ = old.wait();
        self.child = Some(new);
        took
    }

    /// The pid of the daemon serving this mount.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// Unmounts and waits for the daemon; panics if it does not exit cleanly.
    pub fn unmount(&mut self) {
        // A process that was just stopped (a database server whose working
        // directory is the mount) may hold the mount busy for a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        while is_mounted(&self.mnt) {
            let out = run(Command::new(BIN).arg("unmount").arg(&self.mnt));
            if out.status.success() {
                break;
            }
            let busy = String::from_utf8_lossy(&out.stderr).contains("busy");
            if !busy || Instant::now() > deadline {
                ok(Command::new(BIN).arg("unmount").arg(&self.mnt));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(st) = c.try_wait().expect("wait") {
                    assert!(st.success(), "daemon exited with {st}");
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("daemon did not exit within 30 s of unmount");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Asserts that the two sides hold identical trees.
    pub fn assert_identical(&self) {
        let diffs = mirrorfs::recovery::verify::compare_trees(&self.primary, &self.mirror).expect("compare sides");
        assert!(
            diffs.is_empty(),
            "sides differ:\n{}",
            diffs.iter().map(|d| format!("  {d}\n")).collect::<String>()
        );
    }

    /// Unmounts, then checks the sides: the end of every test that writes.
    pub fn finish(mut self) {
        self.unmount();
        self.assert_identical();
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let _ = Command::new(BIN).arg("unmount").arg(&self.mnt).output();
            if is_mounted(&self.mnt) {
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).output();
            }
        }
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for m in self.extra_mounts.drain(..).rev() {
            if Command::new("umount")
                .arg(&m)
                .status()
                .map(|s| !s.success())
                .unwrap_or(true)
            {
                let _ = Command::new("umount").arg("-l").arg(&m).status();
            }
        }
    }
}

// ---------------------------------------------------------------- fault-test helpers

/// True if tests that need root (but not FUSE) can run here, such as the
/// kernel fault fixtures' self-tests. Like `fuse_available`: loud when not,
/// and under CI=true a failure instead of a skip.
pub fn root_available(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let why = format!("{test}: CANNOT RUN: needs root");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{why} -- failing because CI=true");
    }
    eprintln!("\n!!!!!!!! {why} -- NOT TESTED !!!!!!!!\n");
    false
}

/// Runs a command with no stdin, killing it and panicking if it has not
/// finished within `limit`: a hung daemon must fail a test, not hang it.
pub fn run_within(cmd: &mut Command, limit: Duration) -> Output {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut pipes = [
        child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>),
        child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>),
    ];
    let readers: Vec<_> = pipes
        .iter_mut()
        .map(|p| {
            let mut p = p.take().expect("piped");
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = p.read_to_end(&mut buf);
                buf
            })
        })
        .collect();
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut outs = readers.into_iter().map(|r| r.join().unwrap_or_default());
    let (stdout, stderr) = (outs.next().unwrap_or_default(), outs.next().unwrap_or_default());
    let Some(status) = status else {
        panic!(
            "{cmd:?} did not finish within {limit:?}:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
    };
    Output { status, stdout, stderr }
}

/// `len` incompressible bytes, the same for the same seed. Fault tests write
/// these: zram keeps a page of one repeated word without allocating memory,
/// so such a page is still written after `Zram::fail`.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

impl Mounted {
    /// A mount of `primary|mirror` with exactly `opts` (no `create` added)
    /// at a fresh `<tmp>/mnt`. A side given as None is a new empty directory
    /// `<tmp>/primary` or `<tmp>/mirror`; a side given as a path is used as
    /// it is (a fault fixture's side, or a path that does not exist). None
    /// when FUSE tests cannot run here; panics if the daemon does not mount.
    pub fn on_sides(test: &str, primary: Option<&Path>, mirror: Option<&Path>, opts: &str) -> Option<Mounted> {
        if !fuse_available(test) {
            return None;
        }
        let dir = open_tempdir();
        let side = |given: Option<&Path>, name: &str| match given {
            Some(p) => p.to_path_buf(),
            None => {
                let p = dir.path().join(name);
                std::fs::create_dir(&p).expect("side directory");
                p
            }
        };
        let (primary, mirror) = (side(primary, "primary"), side(mirror, "mirror"));
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mountpoint");
        let mut m = Mounted {
            dir,
            primary,
            mirror,
            mnt,
            child: None,
            extra_mounts: Vec::new(),
            env: Vec::new(),
        };
        m.spawn(opts);
        Some(m)
    }
}

impl Mounted {
    /// Kills the daemon this fixture started with SIGKILL (no clean
    /// unmount), reaps it and detaches the dead mount.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        assert!(
            !is_mounted(&self.mnt),
            "{} still mounted after umount -l",
            self.mnt.display()
        );
    }

    /// Starts the foreground daemon again on this pair with exactly `opts`
    /// (after `kill9` or `unmount`).
    pub fn respawn(&mut self, opts: &str) {
        assert!(self.child.is_none(), "the daemon is still running");
        self.spawn(opts);
    }
}
