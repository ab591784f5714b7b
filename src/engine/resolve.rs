//! The decision table: what the caller sees, and what happens to each side,
//! given the two sides' results. One pure function with one test per row.
//!
//! Knows nothing of threads, paths or the sides' health beyond the errno
//! classes in `health`.

use std::io;

use crate::health::is_side_failure;
use crate::spec::Side;

/// What one side did with an operation, as `resolve` sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SideResult {
    Ok,
    Err(i32),
    /// The side was out of service and was not asked.
    Skipped,
}

impl SideResult {
    pub fn of<T>(r: &Option<io::Result<T>>) -> SideResult {
        match r {
            None => SideResult::Skipped,
            Some(Ok(_)) => SideResult::Ok,
            Some(Err(e)) => SideResult::Err(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }
}

/// What a side failure does to the caller (`noswitch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Carry on with the survivor; the caller sees no error.
    Switch,
    /// Fail-stop: the caller gets EIO, and changes are refused while a side
    /// is out of service.
    NoSwitch,
}

/// What the caller is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The value this side returned.
    From(Side),
    /// This errno.
    Errno(i32),
}

/// The outcome of `resolve`: the answer and its side effects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub answer: Answer,
    /// A side whose failure takes it out of service.
    pub mark_down: Option<Side>,
    /// The sides gave different ordinary answers: the path is out of sync.
    pub diverged: bool,
}

const fn decide(answer: Answer, mark_down: Option<Side>, diverged: bool) -> Decision {
    Decision {
        answer,
        mark_down,
        diverged,
    }
}

/// Decides what the caller sees from the two sides' results. "Failure" is a
/// side failure (`health::is_side_failure`, including a timeout), "ordinary"
/// any other errno.
///
/// | primary        | mirror         | answer          | effect               |
/// |----------------|----------------|-----------------|----------------------|
/// | ok             | ok             | primary's value |                      |
/// | ok             | skipped        | primary's value |                      |
/// | skipped        | ok             | mirror's value  |                      |
/// | skipped        | error e        | e               | (last side)          |
/// | error e        | skipped        | e               | (last side)          |
/// | skipped        | skipped        | EIO             | (no side up)         |
/// | ok             | failure        | primary's value | mirror down          |
/// | failure        | ok             | mirror's value  | primary down         |
/// | ok             | ordinary e     | primary's value | diverged             |
/// | ordinary e     | ok             | e               | diverged             |
/// | error e        | same error e   | e               |                      |
/// | failure a      | ordinary b     | b               | primary down         |
/// | ordinary a     | failure b      | a               | mirror down          |
/// | ordinary a     | ordinary b     | a               | diverged             |
/// | failure a      | failure b      | a               | (both failing: none) |
///
/// Under `Policy::NoSwitch`, every row that takes a side down answers EIO
/// instead (the side still goes down and is reported).
pub fn resolve(p: SideResult, m: SideResult, policy: Policy) -> Decision {
    use Answer::{Errno, From};
    use SideResult::{Err, Ok, Skipped};
    let d = match (p, m) {
        (Ok, Ok) | (Ok, Skipped) => decide(From(Side::Primary), None, false),
        (Skipped, Ok) => decide(From(Side::Mirror), None, false),
        (Skipped, Err(e)) | (Err(e), Skipped) => decide(Errno(e), None, false),
        (Skipped, Skipped) => decide(Errno(libc::EIO), None, false),
        (Ok, Err(e)) if is_side_failure(e) => decide(From(Side::Primary), Some(Side::Mirror), false),
        (Err(e), Ok) if is_side_failure(e) => decide(From(Side::Mirror), Some(Side::Primary), false),
        (Ok, Err(_)) => decide(From(Side::Primary), None, true),
        (Err(e), Ok) => decide(Errno(e), None, true),
        (Err(a), Err(b)) if a == b => decide(Errno(a), None, false),
        (Err(a), Err(b)) => match (is_side_failure(a), is_side_failure(b)) {
            (true, false) => decide(Errno(b), Some(Side::Primary), false),
            (false, true) => decide(Errno(a), Some(Side::Mirror), false),
            (false, false) => decide(Errno(a), None, true),
            (true, true) => decide(Errno(a), None, false),
        },
    };
    match policy {
        Policy::NoSwitch if d.mark_down.is_some() => Decision {
            answer: Errno(libc::EIO),
            ..d
        },
        _ => d,
    }
}

#[cfg(test)]
mod tests {
    use super::Answer::{Errno, From};
    use super::SideResult::{Err, Ok, Skipped};
    use super::*;

    const EIO: i32 = libc::EIO;
    const ENOSPC: i32 = libc::ENOSPC;
    const ENOENT: i32 = libc::ENOENT;
    const EEXIST: i32 = libc::EEXIST;
    const S: Policy = Policy::Switch;

    #[test]
    fn both_ok_answers_primary() {
        assert_eq!(resolve(Ok, Ok, S), decide(From(Side::Primary), None, false));
    }
    #[test]
    fn mirror_skipped_answers_primary() {
        assert_eq!(resolve(Ok, Skipped, S), decide(From(Side::Primary), None, false));
    }
    #[test]
    fn primary_skipped_answers_mirror() {
        assert_eq!(resolve(Skipped, Ok, S), decide(From(Side::Mirror), None, false));
    }
    #[test]
    fn last_side_errors_go_to_caller() {
        assert_eq!(resolve(Skipped, Err(EIO), S), decide(Errno(EIO), None, false));
        assert_eq!(resolve(Err(ENOSPC), Skipped, S), decide(Errno(ENOSPC), None, false));
    }
    #[test]
    fn no_side_up_is_eio() {
        assert_eq!(resolve(Skipped, Skipped, S), decide(Errno(EIO), None, false));
    }
    #[test]
    fn mirror_failure_takes_mirror_down() {
        assert_eq!(
            resolve(Ok, Err(EIO), S),
            decide(From(Side::Primary), Some(Side::Mirror), false)
        );
    }
    #[test]
    fn primary_failure_takes_primary_down() {
        assert_eq!(
            resolve(Err(ENOSPC), Ok, S),
            decide(From(Side::Mirror), Some(Side::Primary), false)
        );
    }
    #[test]
    fn mirror_ordinary_error_diverges() {
        assert_eq!(resolve(Ok, Err(ENOENT), S), decide(From(Side::Primary), None, true));
    }
    #[test]
    fn primary_ordinary_error_is_answered_and_diverges() {
        assert_eq!(resolve(Err(EEXIST), Ok, S), decide(Errno(EEXIST), None, true));
    }
    #[test]
    fn same_error_on_both_is_answered() {
        assert_eq!(resolve(Err(ENOENT), Err(ENOENT), S), decide(Errno(ENOENT), None, false));
    }
    #[test]
    fn primary_failure_mirror_ordinary_answers_mirror() {
        assert_eq!(
            resolve(Err(EIO), Err(ENOENT), S),
            decide(Errno(ENOENT), Some(Side::Primary), false)
        );
    }
    #[test]
    fn primary_ordinary_mirror_failure_answers_primary() {
        assert_eq!(
            resolve(Err(ENOENT), Err(EIO), S),
            decide(Errno(ENOENT), Some(Side::Mirror), false)
        );
    }
    #[test]
    fn different_ordinary_errors_diverge() {
        assert_eq!(resolve(Err(ENOENT), Err(EEXIST), S), decide(Errno(ENOENT), None, true));
    }
    #[test]
    fn both_failing_marks_neither() {
        assert_eq!(resolve(Err(EIO), Err(ENOSPC), S), decide(Errno(EIO), None, false));
    }

    #[test]
    fn a_timeout_is_a_side_failure() {
        assert_eq!(
            resolve(Ok, Err(libc::ETIMEDOUT), S),
            decide(From(Side::Primary), Some(Side::Mirror), false)
        );
    }
    #[test]
    fn noswitch_answers_eio_where_a_side_goes_down() {
        let n = Policy::NoSwitch;
        assert_eq!(
            resolve(Ok, Err(ENOSPC), n),
            decide(Errno(EIO), Some(Side::Mirror), false)
        );
        assert_eq!(resolve(Err(EIO), Ok, n), decide(Errno(EIO), Some(Side::Primary), false));
        assert_eq!(resolve(Ok, Ok, n), decide(From(Side::Primary), None, false));
        assert_eq!(resolve(Ok, Err(ENOENT), n), decide(From(Side::Primary), None, true));
    }
}
