//! Where a mount's runtime files live, which mounts are mirrorfs mounts, and
//! how a command's failure maps to an exit code.
//!
//! Owns: `/run/mirrorfs` naming, the mount table reading, `Failure`. Shared
//! by the daemon and the control clients, so neither imports the other.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

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

/// One line of /proc/self/mountinfo that is a mirrorfs mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub mountpoint: PathBuf,
    pub source: String,
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
            let mountpoint = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let source = r.next()?;
            (fstype == "fuse.mirrorfs").then(|| MountEntry {
                mountpoint: PathBuf::from(unescape_mountinfo(mountpoint)),
                source: unescape_mountinfo(source),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_mirrorfs_mounts_in_mountinfo() {
        let text = "36 35 98:0 / /mnt/a\\040b rw,relatime shared:1 - fuse.mirrorfs /p|/m rw,user_id=0\n\
                    37 35 98:0 / /other rw - ext4 /dev/sda1 rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(
            m,
            vec![MountEntry {
                mountpoint: PathBuf::from("/mnt/a b"),
                source: "/p|/m".into()
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
