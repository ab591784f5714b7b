//! Bringing a side back: the resync thread (`catchup`), the copier
//! (`resync`) and the tree comparison (`verify`).
//!
//! Uses the engine to reach the sides (every call on a side that is being
//! caught up runs with `side_timeout`), the journals, and the open-file
//! table; the engine knows nothing of it.

pub mod catchup;
pub mod resync;
pub mod verify;
