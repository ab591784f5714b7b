//! Integration tests: every test mounts a real mirrorfs over temporary
//! directories and, if it writes, ends by checking that the two sides are
//! identical. They need root and /dev/fuse; without them they say so loudly,
//! and under CI=true they fail.

mod common;

mod asynchronous;
mod cli;
mod crash;
mod failover;
mod faults;
mod metrics;
mod package;
mod posix;
mod resync;
mod transport;
mod verify;
mod workloads;
