//! The health of the two sides and the classification of errors.
//!
//! Owns: `SideState` and every change of it, the per-side error counters and
//! the latest probe of a down side. A side goes down here and nowhere else,
//! once, atomically, and never when it is the last side up. Knows nothing of
//! FUSE, paths or the engine's operations beyond their names.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::SystemTime;

use crate::spec::Side;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SideState {
    /// In service: every change goes to it.
    Up,
    /// Out of service after a failure, a timeout, `mirrorfs fail`, or
    /// because it was unusable at mount (`mirror_skip`). Nothing touches it.
    Down,
    /// Out of service by choice (`mirrors=off`).
    Off,
}

impl SideState {
    const fn code(self) -> u8 {
        match self {
            SideState::Up => 0,
            SideState::Down => 1,
            SideState::Off => 2,
        }
    }

    fn from_code(v: u8) -> SideState {
        match v {
            0 => SideState::Up,
            1 => SideState::Down,
            _ => SideState::Off,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SideState::Up => "UP",
            SideState::Down => "DOWN",
            SideState::Off => "OFF",
        }
    }
}

/// The operation that took a side down by hand.
pub const OP_FAIL: &str = "fail";
/// The operation that found a side unusable when mounting.
pub const OP_MOUNT: &str = "mount";

/// Why and when a side went down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DownInfo {
    pub since: SystemTime,
    pub op: String,
    /// None when the side was taken down by hand.
    pub errno: Option<i32>,
}

impl DownInfo {
    /// The reason in words, for status.
    pub fn reason(&self) -> String {
        match (self.op.as_str(), self.errno) {
            (OP_FAIL, _) => "taken out of service by `mirrorfs fail`".to_string(),
            (OP_MOUNT, Some(e)) => format!(
                "unusable at mount ({}), started without it (mirror_skip)",
                errno_name(e)
            ),
            (op, Some(libc::ETIMEDOUT)) => format!("{op} did not answer within side_timeout"),
            (op, Some(e)) => format!("{op} failed with {}", errno_name(e)),
            (op, None) => format!("{op} failed"),
        }
    }
}

/// The kind of operation, for the READ/WRITE/OTHER error counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpClass {
    Read,
    Write,
    Other,
}

impl OpClass {
    pub fn of(op: &str) -> OpClass {
        match op {
            "read" | "readdir" | "readdirplus" | "lookup" | "getattr" | "readlink" | "getxattr" | "listxattr"
            | "lseek" | "statfs" => OpClass::Read,
            "write" | "fallocate" | "copy_file_range" | "fsync" | "fsyncdir" | "flush" => OpClass::Write,
            _ => OpClass::Other,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Side-failure counts of one side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    pub read: u64,
    pub write: u64,
    pub other: u64,
}

/// The outcome of the latest probe of a side that is out of service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub at: SystemTime,
    /// None when the side answered; the errno (ETIMEDOUT: no answer) otherwise.
    pub errno: Option<i32>,
}

/// True for the errnos that mean "this side is failing" rather than an
/// ordinary answer about the file (SPEC section 4). ETIMEDOUT stands for a
/// side that did not answer within `side_timeout`.
pub fn is_side_failure(errno: i32) -> bool {
    matches!(
        errno,
        libc::EIO
            | libc::EROFS
            | libc::ENOSPC
            | libc::EDQUOT
            | libc::ENOTCONN
            | libc::ESTALE
            | libc::ENODEV
            | libc::ENXIO
            | libc::ETIMEDOUT
    )
}

/// The symbolic name of an errno, for logs and events.
pub fn errno_name(errno: i32) -> String {
    let e = nix::errno::Errno::from_raw(errno);
    if e == nix::errno::Errno::UnknownErrno {
        format!("E{errno}")
    } else {
        format!("{e:?}")
    }
}

/// `errno_name`, or "-" where there is no errno (a side taken down by hand).
pub fn errno_label(errno: Option<i32>) -> String {
    errno.map(errno_name).unwrap_or_else(|| "-".into())
}

/// The state of both sides.
#[derive(Debug)]
pub struct Health {
    states: [AtomicU8; 2],
    down: Mutex<[Option<DownInfo>; 2]>,
    errors: [[AtomicU64; 3]; 2],
    probes: Mutex<[Option<Probe>; 2]>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            states: [AtomicU8::new(0), AtomicU8::new(0)],
            down: Mutex::new([None, None]),
            errors: Default::default(),
            probes: Mutex::new([None, None]),
        }
    }
}

impl Health {
    pub fn state(&self, side: Side) -> SideState {
        SideState::from_code(self.states[side.index()].load(Ordering::Acquire))
    }

    pub fn is_up(&self, side: Side) -> bool {
        self.state(side) == SideState::Up
    }

    pub fn down_info(&self, side: Side) -> Option<DownInfo> {
        self.down.lock().unwrap_or_else(|e| e.into_inner())[side.index()].clone()
    }

    /// Marks `side` down because `op` failed with `errno` (None: by hand).
    /// Returns true if this call changed the state. The last side up is
    /// never marked down.
    pub fn mark_down(&self, side: Side, op: &str, errno: Option<i32>) -> bool {
        // The lock makes "is the other side up" and "mark this one down" one
        // step, so two racing failures cannot take both sides down.
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        if !self.is_up(side) || !self.is_up(side.other()) {
            return false;
        }
        self.states[side.index()].store(SideState::Down.code(), Ordering::Release);
        down[side.index()] = Some(DownInfo {
            since: SystemTime::now(),
            op: op.to_string(),
            errno,
        });
        log::warn!("side={side} state=DOWN op={op} errno={}", errno_label(errno));
        true
    }

    /// Sets the state a side starts the mount in: down because it was
    /// unusable (`errno`), or off by choice.
    pub fn start_out_of_service(&self, side: Side, state: SideState, errno: Option<i32>) {
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        self.states[side.index()].store(state.code(), Ordering::Release);
        if state == SideState::Down {
            down[side.index()] = Some(DownInfo {
                since: SystemTime::now(),
                op: OP_MOUNT.to_string(),
                errno,
            });
        }
    }

    /// Counts a side failure of `op` on `side`.
    pub fn count_error(&self, side: Side, op: &str) {
        self.errors[side.index()][OpClass::of(op).index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn counters(&self, side: Side) -> Counters {
        let c = &self.errors[side.index()];
        Counters {
            read: c[OpClass::Read.index()].load(Ordering::Relaxed),
            write: c[OpClass::Write.index()].load(Ordering::Relaxed),
            other: c[OpClass::Other.index()].load(Ordering::Relaxed),
        }
    }

    /// Records a probe of `side`; returns the previous one.
    pub fn set_probe(&self, side: Side, probe: Probe) -> Option<Probe> {
        self.probes.lock().unwrap_or_else(|e| e.into_inner())[side.index()].replace(probe)
    }

    pub fn probe(&self, side: Side) -> Option<Probe> {
        self.probes.lock().unwrap_or_else(|e| e.into_inner())[side.index()].clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_side_failures() {
        for e in [
            libc::EIO,
            libc::EROFS,
            libc::ENOSPC,
            libc::EDQUOT,
            libc::ENOTCONN,
            libc::ESTALE,
            libc::ENODEV,
            libc::ENXIO,
            libc::ETIMEDOUT,
        ] {
            assert!(is_side_failure(e), "{}", errno_name(e));
        }
        for e in [
            libc::ENOENT,
            libc::EEXIST,
            libc::ENOTEMPTY,
            libc::EACCES,
            libc::EPERM,
            libc::EINVAL,
        ] {
            assert!(!is_side_failure(e), "{}", errno_name(e));
        }
    }

    #[test]
    fn never_marks_the_last_side_down() {
        let h = Health::default();
        assert!(h.mark_down(Side::Mirror, "write", Some(libc::EIO)));
        assert!(!h.mark_down(Side::Mirror, "write", Some(libc::EIO)), "only once");
        assert!(
            !h.mark_down(Side::Primary, "write", Some(libc::EIO)),
            "last side stays up"
        );
        assert!(h.is_up(Side::Primary));
        assert_eq!(h.down_info(Side::Mirror).unwrap().errno, Some(libc::EIO));
    }

    #[test]
    fn an_off_side_counts_as_out_of_service() {
        let h = Health::default();
        h.start_out_of_service(Side::Mirror, SideState::Off, None);
        assert_eq!(h.state(Side::Mirror), SideState::Off);
        assert!(
            !h.mark_down(Side::Primary, "write", Some(libc::EIO)),
            "the primary is the last side"
        );
    }

    #[test]
    fn counts_errors_by_class() {
        let h = Health::default();
        h.count_error(Side::Mirror, "write");
        h.count_error(Side::Mirror, "fsync");
        h.count_error(Side::Mirror, "read");
        h.count_error(Side::Mirror, "mkdir");
        assert_eq!(
            h.counters(Side::Mirror),
            Counters {
                read: 1,
                write: 2,
                other: 1
            }
        );
        assert_eq!(h.counters(Side::Primary), Counters::default());
    }

    #[test]
    fn explains_why_a_side_is_down() {
        let d = |op: &str, errno| DownInfo {
            since: SystemTime::now(),
            op: op.into(),
            errno,
        };
        assert_eq!(d("write", Some(libc::EIO)).reason(), "write failed with EIO");
        assert!(d("fsync", Some(libc::ETIMEDOUT)).reason().contains("side_timeout"));
        assert!(d(OP_FAIL, None).reason().contains("mirrorfs fail"));
        assert!(d(OP_MOUNT, Some(libc::ENOENT)).reason().contains("mirror_skip"));
    }

    #[test]
    fn names_errnos() {
        assert_eq!(errno_name(libc::EIO), "EIO");
        assert_eq!(errno_name(libc::ENOSPC), "ENOSPC");
    }
}
