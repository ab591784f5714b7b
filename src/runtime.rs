//! Where a mount's runtime files live, which mounts are mirrorfs mounts, and
//! how a command's failure maps to an exit code.
//!
//! Owns: `/run/mirrorfs` naming, the mount table reading, `Failure`. Shared
//! by the daemon and the control clients, so neither imports the other.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Exit code for "unknown": not a mirrorfs mount, or no daemon answering
/// (the monitoring-plugin convention `mirrorfs status` follows).
pub const EXIT_UNKNOWN: u8 = 3;

pub const RUN_DIR: &str = "/run/mirrorfs";

/// Why a command failed, with the exit code it maps to.
#[derive(Debug)]
pub enum Failure {
    /// The command line is wrong: exit 2.
    Usage(String),
    /// The command could not be carried out: exit 1.
    Runtime(String),
    /// Not a mirrorfs mount, or no daemon answering: exit 3 (status).
    Unknown(String),
}

impl Failure {
    pub fn message(&self) -> &str {
        match self {
            Failure::Usage(m) | Failure::Runtime(m) | Failure::Unknown(m) => m,
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Usage(_) => 2,
            Failure::Runtime(_) => 1,
            Failure::Unknown(_) => EXIT_UNKNOWN,
        }
    }
}

/// A runtime file for the mount at `mountpoint` (pid file, log).
pub fn runtime_file(mountpoint: &Path, ext: &str) -> PathBuf {
    let h = xxhash_rust::xxh3::xxh3_64(mountpoint.as_os_str().as_bytes());
    Path::new(RUN_DIR).join(format!("{h:016x}.{ext}"))
}

/// How long a new mount waits for a daemon that is exiting (after a
/// `kill -9`, say) to let go of its mount and its side locks.
pub const EXIT_WAIT: Duration = Duration::from_secs(10);

/// Where a process is on its way out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    Running,
    /// Killed or exiting, but some of it is still there (threads finishing
    /// a system call, files not yet closed).
    Exiting,
    /// No longer there, or a zombie whose threads have all ended.
    Gone,
}

/// How alive the process `pid` is, from /proc.
pub fn liveness(pid: i32) -> Liveness {
    const PF_EXITING: u64 = 0x4;
    const SIGKILL_BIT: u64 = 1 << (libc::SIGKILL - 1);
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Liveness::Gone;
    };
    // Fields after the command name: state, ppid, pgrp, session, tty_nr,
    // tpgid, flags, ...
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, r)| r.split_whitespace().collect());
    let state = fields.first().copied().unwrap_or("X");
    let flags: u64 = fields.get(6).and_then(|f| f.parse().ok()).unwrap_or(0);
    let threads = fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count());
    if matches!(state, "Z" | "X") {
        return if threads > 1 { Liveness::Exiting } else { Liveness::Gone };
    }
    if flags & PF_EXITING != 0 {
        return Liveness::Exiting;
    }
    // A SIGKILL sent but not yet acted on: the process is as good as gone.
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let killed = status.lines().any(|l| {
        l.strip_prefix("ShdPnd:")
            .or_else(|| l.strip_prefix("SigPnd:"))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .is_some_and(|m| m & SIGKILL_BIT != 0)
    });
    if killed { Liveness::Exiting } else { Liveness::Running }
}

/// The processes that have `path` open, once per open fd, found by their
/// fd links (read without touching the file, so a hung side cannot hold
/// the search).
pub fn holders_of(path: &Path) -> Vec<i32> {
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut holders = Vec::new();
    for pid in procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
    {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let open = fds
            .flatten()
            .filter(|fd| fs::read_link(fd.path()).is_ok_and(|l| l == path));
        holders.extend(open.map(|_| pid));
    }
    holders
}

/// One line of /proc/self/mountinfo that is a mirrorfs mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub mountpoint: PathBuf,
    pub source: String,
    /// The mount's device, `major:minor` (its bdi in /sys/class/bdi).
    pub dev: String,
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every mirrorfs mount on the machine.
pub fn mirrorfs_mounts() -> Vec<MountEntry> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    parse_mountinfo(&text)
}

pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let dev = left.split(' ').nth(2)?;
            let mountpoint = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let source = r.next()?;
            (fstype == "fuse.mirrorfs").then(|| MountEntry {
                mountpoint: PathBuf::from(unescape_mountinfo(mountpoint)),
                source: unescape_mountinfo(source),
                dev: dev.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_a_running_process_from_a_killed_one() {
        let me = std::process::id() as i32;
        assert_eq!(liveness(me), Liveness::Running);
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        assert_eq!(liveness(pid), Liveness::Running);
        child.kill().unwrap();
        // Killed but not yet reaped: on its way out, or a zombie.
        assert_ne!(liveness(pid), Liveness::Running);
        child.wait().unwrap();
        assert_eq!(liveness(pid), Liveness::Gone);
    }

    #[test]
    fn finds_each_open_of_a_file() {
        let t = tempfile::tempdir().unwrap();
        let path = fs::canonicalize(t.path()).unwrap().join("f");
        let me = std::process::id() as i32;
        assert_eq!(holders_of(&path), Vec::<i32>::new());
        let a = fs::File::create(&path).unwrap();
        assert_eq!(holders_of(&path), vec![me]);
        let b = fs::File::open(&path).unwrap();
        assert_eq!(holders_of(&path), vec![me, me]);
        drop((a, b));
        assert_eq!(holders_of(&path), Vec::<i32>::new());
    }

    #[test]
    fn finds_mirrorfs_mounts_in_mountinfo() {
        let text = "36 35 98:0 / /mnt/a\\040b rw,relatime shared:1 - fuse.mirrorfs /p|/m rw,user_id=0\n\
                    37 35 98:0 / /other rw - ext4 /dev/sda1 rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(
            m,
            vec![MountEntry {
                mountpoint: PathBuf::from("/mnt/a b"),
                source: "/p|/m".into(),
                dev: "98:0".into()
            }]
        );
    }

    #[test]
    fn runtime_files_differ_per_mountpoint() {
        assert_ne!(
            runtime_file(Path::new("/a"), "pid"),
            runtime_file(Path::new("/b"), "pid")
        );
        assert!(runtime_file(Path::new("/a"), "pid").starts_with(RUN_DIR));
    }
}
