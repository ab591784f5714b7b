//! What documents mirrorfs beyond what clap derives from the command line:
//! the mount options, states, exit codes, events, files and examples. Both
//! `--help` and the man pages (made by `build.rs`, which includes this file
//! and `cli.rs`) are written from these tables, so they cannot disagree.
//!
//! Pure data and formatting: no I/O, no other module of the crate.

/// A term and what it means.
pub type Entry = (&'static str, &'static str);

pub const MOUNT_OPTIONS: &[Entry] = &[
    ("create", "create missing backing directories and the mountpoint"),
    ("ro", "read-only mount; allowed with one side missing"),
    (
        "allow_other",
        "let other users (a database user, say) use the mount; the kernel checks permissions, and files are created owned by the calling user",
    ),
    ("fsname=NAME", "the source shown in the mount table (default: the spec)"),
    (
        "mirror_skip",
        "start even if one side is missing or unusable: the mount starts DEGRADED and records every change the absent side misses",
    ),
    (
        "noswitch",
        "fail-stop: an operation that meets a side failure returns EIO instead of carrying on with the survivor",
    ),
    (
        "mirrors=off",
        "run on the primary alone, recording what the mirror misses so that it can be caught up later",
    ),
    (
        "side_timeout=S",
        "a side that has not answered an operation within S seconds is marked DOWN (default 30)",
    ),
    (
        "probe_interval=S",
        "how often a DOWN side is probed for its return (default 5)",
    ),
    (
        "noautoresync",
        "a side that answers its probe again, or a stale side at mount, stays DOWN until mirrorfs resync",
    ),
    (
        "hook=PROGRAM",
        "run PROGRAM for each event, the event as one JSON line on stdin; it must exist and be executable",
    ),
    (
        "async",
        "the mirror follows the primary from an ordered change log instead of taking each change with it (not with noswitch or mirrors=off)",
    ),
    (
        "max_lag=S",
        "async: writers wait while the oldest change not yet on the mirror is older than S seconds (default 5)",
    ),
    (
        "max_log=SIZE",
        "async: the change log kept for a mirror that is DOWN before a resync takes over (default 1G)",
    ),
];

pub const MOUNT_STATES: &[Entry] = &[
    ("HEALTHY", "both sides UP and identical"),
    ("RESYNCING", "a side being caught up, or paths pending resync"),
    ("DEGRADED", "a side DOWN, or OFF (mirrors=off)"),
    (
        "SPLIT",
        "both sides took changes the other lacks; the operator names the winner",
    ),
];

pub const SIDE_STATES: &[Entry] = &[
    ("UP", "in service: every change goes to it"),
    (
        "DOWN",
        "out of service: a failure, a timeout, mirrorfs fail, or left out at mount",
    ),
    ("RESYNCING", "being caught up from the other side"),
    ("OFF", "left out by mirrors=off"),
];

pub const EXIT_CODES: &[Entry] = &[
    ("0", "success"),
    (
        "1",
        "the command could not be carried out (mount failed, side in use, ...)",
    ),
    ("2", "usage error: bad arguments, options or PRIMARY|MIRROR spec"),
];

pub const STATUS_EXIT_CODES: &[Entry] = &[
    ("0", "HEALTHY"),
    ("1", "RESYNCING, or a side OFF (mirrors=off)"),
    ("2", "DEGRADED (a side DOWN) or SPLIT"),
    ("3", "unknown: not a mirrorfs mount, or no daemon answering"),
];

pub const EVENTS: &[Entry] = &[
    ("mounted, unmounted", "the mount started or ended"),
    ("mirror_skip", "the mount started without a side (mirror_skip)"),
    ("side_down", "a side went out of service, with the operation and errno"),
    ("side_up", "a side is back in service and identical"),
    (
        "diverged",
        "the sides gave different answers for a path; it is caught up from the primary",
    ),
    (
        "resync_started, resync_progress, resync_done",
        "a resync began, goes on (every 5 s), ended",
    ),
    ("split_brain", "both sides took changes the other lacks"),
    (
        "crash_recovery",
        "the mount found writes in flight from a crash and made the sides agree",
    ),
    ("verify_mismatch", "reserved"),
    (
        "lag_exceeded, lag_recovered",
        "async: the mirror fell more than max_lag behind (writers wait), or is back under it",
    ),
];

pub const FILES: &[Entry] = &[
    (
        ".mirrorfs/identity.json",
        "the side's identity: its pair, its own id and role",
    ),
    (
        ".mirrorfs/state.json",
        "what the other side is missing: stale since when, and why",
    ),
    (
        ".mirrorfs/journal",
        "the paths changed while the other side was out of service",
    ),
    (
        ".mirrorfs/changelog/",
        "async, on the primary: the change log the mirror follows",
    ),
    (
        ".mirrorfs/shipped",
        "async, on the mirror: how far the change log has been applied",
    ),
    (
        ".mirrorfs/intent",
        "the write-intent record: files being written, checked after a crash",
    ),
    (".mirrorfs/events.log", "the event log, one JSON line per event"),
    (".mirrorfs/lock", "held by the daemon that serves the side"),
    (
        "/run/mirrorfs/HASH.sock, .pid, .log",
        "a mount's control socket, daemon pid and log",
    ),
    (
        "/etc/mirrorfs/NAME.conf",
        "SPEC, MOUNTPOINT and OPTIONS for mirrorfs@NAME.service",
    ),
];

/// (what, commands): each a short example.
pub const EXAMPLES: &[Entry] = &[
    (
        "Mount a pair for a database user",
        "mirrorfs mount -o allow_other,create '/disk1/pg|/disk2/pg' /srv/pg",
    ),
    (
        "The same in /etc/fstab (mount /srv/pg, or mount -a)",
        "/disk1/pg|/disk2/pg  /srv/pg  fuse.mirrorfs  allow_other,nofail  0 0",
    ),
    (
        "From systemd, with /etc/mirrorfs/pg.conf holding SPEC=, MOUNTPOINT= and OPTIONS=",
        "systemctl enable --now mirrorfs@pg",
    ),
    ("Watch it", "mirrorfs status /srv/pg; mirrorfs events --follow /srv/pg"),
    (
        "Bring a repaired or replaced side back now",
        "mirrorfs resync --wait /srv/pg",
    ),
    (
        "After a split brain, make the primary equal to the mirror",
        "mirrorfs resync --wait --from mirror /srv/pg",
    ),
    ("Check that both sides hold the same", "mirrorfs verify /srv/pg"),
];

/// A titled table for `--help`: the terms in a column, then their meaning,
/// wrapped to 80 columns.
pub fn help_table(title: &str, rows: &[Entry]) -> String {
    let width = rows.iter().map(|(t, _)| t.len()).max().unwrap_or(0);
    let room = 80usize.saturating_sub(width + 4).max(20);
    let mut out = format!("{title}:\n");
    for (term, meaning) in rows {
        let mut line = format!("  {term:<width$} ");
        let mut used = 0;
        for word in meaning.split(' ') {
            if used > 0 && used + 1 + word.len() > room {
                out.push_str(&line);
                out.push('\n');
                line = " ".repeat(width + 3);
                used = 0;
            }
            line.push(' ');
            line.push_str(word);
            used += 1 + word.len();
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// The exit codes, for `mirrorfs --help` and `mirrorfs status --help`.
pub fn exit_codes_help() -> String {
    format!(
        "{}\n{}",
        help_table("Exit codes", EXIT_CODES),
        help_table(
            "Exit codes of `mirrorfs status` (monitoring-plugin convention)",
            STATUS_EXIT_CODES
        )
    )
}
