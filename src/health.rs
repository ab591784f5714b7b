//! The health of the two sides and the classification of errors.
//!
//! Owns: `SideState` and every change of it. A side goes down here and
//! nowhere else, once, atomically, and never when it is the last side up.
//! Knows nothing of FUSE, paths or the engine's operations beyond their names.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::SystemTime;

use crate::spec::Side;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SideState {
    Up,
    Down,
}

impl SideState {
    fn from_u8(v: u8) -> SideState {
        if v == 0 { SideState::Up } else { SideState::Down }
    }
}

/// Why and when a side went down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DownInfo {
    pub since: SystemTime,
    pub op: String,
    pub errno: i32,
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

/// The state of both sides.
#[derive(Debug)]
pub struct Health {
    states: [AtomicU8; 2],
    down: Mutex<[Option<DownInfo>; 2]>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            states: [AtomicU8::new(0), AtomicU8::new(0)],
            down: Mutex::new([None, None]),
        }
    }
}

impl Health {
    pub fn state(&self, side: Side) -> SideState {
        SideState::from_u8(self.states[side.index()].load(Ordering::Acquire))
    }

    pub fn is_up(&self, side: Side) -> bool {
        self.state(side) == SideState::Up
    }

    pub fn down_info(&self, side: Side) -> Option<DownInfo> {
        self.down.lock().unwrap_or_else(|e| e.into_inner())[side.index()].clone()
    }

    /// Marks `side` down because `op` failed with `errno`. Returns true if
    /// this call changed the state. The last side up is never marked down.
    pub fn mark_down(&self, side: Side, op: &str, errno: i32) -> bool {
        // The lock makes "is the other side up" and "mark this one down" one
        // step, so two racing failures cannot take both sides down.
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        if !self.is_up(side) || !self.is_up(side.other()) {
            return false;
        }
        self.states[side.index()].store(1, Ordering::Release);
        down[side.index()] = Some(DownInfo {
            since: SystemTime::now(),
            op: op.to_string(),
            errno,
        });
        log::warn!("side={side} state=DOWN op={op} errno={}", errno_name(errno));
        true
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
        assert!(h.mark_down(Side::Mirror, "write", libc::EIO));
        assert!(!h.mark_down(Side::Mirror, "write", libc::EIO), "only once");
        assert!(!h.mark_down(Side::Primary, "write", libc::EIO), "last side stays up");
        assert!(h.is_up(Side::Primary));
        assert_eq!(h.down_info(Side::Mirror).unwrap().errno, libc::EIO);
    }

    #[test]
    fn names_errnos() {
        assert_eq!(errno_name(libc::EIO), "EIO");
        assert_eq!(errno_name(libc::ENOSPC), "ENOSPC");
    }
}
