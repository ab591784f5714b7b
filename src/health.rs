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
    /// Being caught up: every change goes to it, but it answers no reads
    /// and its results never decide what the caller sees.
    Resyncing,
}

impl SideState {
    const fn code(self) -> u8 {
        match self {
            SideState::Up => 0,
            SideState::Down => 1,
            SideState::Off => 2,
            SideState::Resyncing => 3,
        }
    }

    fn from_code(v: u8) -> SideState {
        match v {
            0 => SideState::Up,
            1 => SideState::Down,
            2 => SideState::Off,
            _ => SideState::Resyncing,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SideState::Up => "UP",
            SideState::Down => "DOWN",
            SideState::Off => "OFF",
            SideState::Resyncing => "RESYNCING",
        }
    }
}

/// The operation that took a side down by hand.
pub const OP_FAIL: &str = "fail";
/// The operation that found a side unusable when mounting.
pub const OP_MOUNT: &str = "mount";

/// The operation that found both sides changed apart (split brain).
pub const OP_SPLIT: &str = "split";

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
            (OP_SPLIT, _) => "split brain: both sides took changes the other lacks".to_string(),
            (OP_MOUNT, Some(libc::ESTALE)) => "stale: it missed changes while out of service".to_string(),
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

    /// True while changes go to `side`: it is up or being caught up.
    pub fn takes_changes(&self, side: Side) -> bool {
        matches!(self.state(side), SideState::Up | SideState::Resyncing)
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
        if !self.takes_changes(side) || !self.is_up(side.other()) {
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

    /// Starts catching `side` up: from DOWN or OFF to RESYNCING, while the
    /// other side is up. Returns false if that is not the case.
    pub fn begin_resync(&self, side: Side) -> bool {
        let _down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        if !matches!(self.state(side), SideState::Down | SideState::Off) || !self.is_up(side.other()) {
            return false;
        }
        self.states[side.index()].store(SideState::Resyncing.code(), Ordering::Release);
        log::info!("side={side} state=RESYNCING");
        true
    }

    /// Ends a resync: the side is caught up and back in service.
    pub fn resync_done(&self, side: Side) -> bool {
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        if self.state(side) != SideState::Resyncing {
            return false;
        }
        down[side.index()] = None;
        self.states[side.index()].store(SideState::Up.code(), Ordering::Release);
        self.probes.lock().unwrap_or_else(|e| e.into_inner())[side.index()] = None;
        log::info!("side={side} state=UP");
        true
    }

    /// Resolves a split: `winner` serves, its peer is down until it has been
    /// caught up from it.
    pub fn make_winner(&self, winner: Side) {
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        down[winner.index()] = None;
        self.states[winner.index()].store(SideState::Up.code(), Ordering::Release);
        down[winner.other().index()] = Some(DownInfo {
            since: SystemTime::now(),
            op: OP_SPLIT.to_string(),
            errno: Some(libc::ESTALE),
        });
        self.states[winner.other().index()].store(SideState::Down.code(), Ordering::Release);
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
    fn a_resync_brings_a_down_side_back_or_fails_it_again() {
        let h = Health::default();
        assert!(!h.begin_resync(Side::Mirror), "an up side is not resynced");
        h.mark_down(Side::Mirror, "write", Some(libc::EIO));
        assert!(h.begin_resync(Side::Mirror));
        assert!(h.takes_changes(Side::Mirror) && !h.is_up(Side::Mirror));
        assert!(
            h.mark_down(Side::Mirror, "write", Some(libc::EIO)),
            "a failure during resync"
        );
        assert!(h.begin_resync(Side::Mirror));
        assert!(h.resync_done(Side::Mirror));
        assert!(h.is_up(Side::Mirror) && h.down_info(Side::Mirror).is_none());
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
