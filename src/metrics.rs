//! `mirrorfs metrics`: the state of the mirrorfs mounts in the Prometheus
//! text format (0.0.4), for node_exporter's textfile collector.
//!
//! Owns: the metric names. Every figure comes from the same `Status` that
//! `mirrorfs status --json` prints, so the two always agree.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Metric, Registry, Unit};

use crate::control::{self, EXIT_UNKNOWN, Status};
use crate::runtime::{Failure, mirrorfs_mounts};

pub const MOUNT_STATES: [&str; 4] = ["HEALTHY", "RESYNCING", "DEGRADED", "SPLIT"];
pub const SIDE_STATES: [&str; 4] = ["UP", "DOWN", "RESYNCING", "OFF"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Mount {
    mountpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MountState {
    mountpoint: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SideState {
    mountpoint: String,
    side: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SideErrors {
    mountpoint: String,
    side: String,
    class: String,
}

/// The metric families, registered once.
struct Metrics {
    registry: Registry,
    up: Family<Mount, Gauge>,
    status_code: Family<Mount, Gauge>,
    state: Family<MountState, Gauge>,
    side_state: Family<SideState, Gauge>,
    side_errors: Family<SideErrors, Counter>,
    pending_paths: Family<Mount, Gauge>,
    events_dropped: Family<Mount, Counter>,
    resync_files_done: Family<Mount, Gauge>,
    resync_files_planned: Family<Mount, Gauge>,
    resync_done_bytes: Family<Mount, Gauge>,
    resync_planned_bytes: Family<Mount, Gauge>,
    resync_copied_bytes: Family<Mount, Counter>,
    uptime: Family<Mount, Gauge<f64, AtomicU64>>,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mirrorfs");
        let r = &mut registry;
        Metrics {
            up: metric(r, "up", "1 if the mount's daemon answered, 0 if not", None),
            status_code: metric(
                r,
                "status_code",
                "The exit code of `mirrorfs status`: 0 healthy, 1 resyncing or mirrors=off, 2 degraded or split, 3 unknown",
                None,
            ),
            state: metric(
                r,
                "state",
                "1 for the mount's state (HEALTHY, RESYNCING, DEGRADED, SPLIT), 0 for the others",
                None,
            ),
            side_state: metric(
                r,
                "side_state",
                "1 for each side's state (UP, DOWN, RESYNCING, OFF), 0 for the others",
                None,
            ),
            side_errors: metric(
                r,
                "side_errors",
                "Side failures counted since the mount, by class of operation (read, write, other)",
                None,
            ),
            pending_paths: metric(
                r,
                "pending_paths",
                "Paths recorded as out of sync, waiting for a resync",
                None,
            ),
            events_dropped: metric(
                r,
                "events_dropped",
                "Events dropped because a log, hook or follower queue was full",
                None,
            ),
            resync_files_done: metric(
                r,
                "resync_files_done",
                "Files examined by the running resync (0 when none runs)",
                None,
            ),
            resync_files_planned: metric(
                r,
                "resync_files_planned",
                "Files the running resync will examine (0 when none runs)",
                None,
            ),
            resync_done_bytes: metric(
                r,
                "resync_done",
                "Bytes compared by the running resync (0 when none runs)",
                Some(Unit::Bytes),
            ),
            resync_planned_bytes: metric(
                r,
                "resync_planned",
                "Bytes the running resync will compare (0 when none runs)",
                Some(Unit::Bytes),
            ),
            resync_copied_bytes: metric(
                r,
                "resync_copied",
                "Bytes copied by resyncs since the mount",
                Some(Unit::Bytes),
            ),
            uptime: metric(
                r,
                "uptime",
                "Seconds since the daemon started serving",
                Some(Unit::Seconds),
            ),
            registry,
        }
    }

    /// A mount whose daemon answered.
    fn add(&self, st: &Status) {
        let mountpoint = st.mountpoint.display().to_string();
        let mount = Mount {
            mountpoint: mountpoint.clone(),
        };
        self.up.get_or_create(&mount).set(1);
        self.status_code.get_or_create(&mount).set(i64::from(st.exit_code()));
        for state in MOUNT_STATES {
            let labels = MountState {
                mountpoint: mountpoint.clone(),
                state: state.into(),
            };
            self.state.get_or_create(&labels).set(i64::from(st.state == state));
        }
        for side in &st.sides {
            for state in SIDE_STATES {
                let labels = SideState {
                    mountpoint: mountpoint.clone(),
                    side: side.side.to_string(),
                    state: state.into(),
                };
                self.side_state
                    .get_or_create(&labels)
                    .set(i64::from(side.state == state));
            }
            for (class, n) in [
                ("read", side.errors.read),
                ("write", side.errors.write),
                ("other", side.errors.other),
            ] {
                let labels = SideErrors {
                    mountpoint: mountpoint.clone(),
                    side: side.side.to_string(),
                    class: class.into(),
                };
                self.side_errors.get_or_create(&labels).inc_by(n);
            }
        }
        self.pending_paths.get_or_create(&mount).set(gauge(st.pending_paths));
        self.events_dropped.get_or_create(&mount).inc_by(st.events_dropped);
        let r = st.resync.as_ref();
        let resync = |f: fn(&crate::recovery::catchup::ResyncStatus) -> u64| gauge(r.map_or(0, f));
        self.resync_files_done
            .get_or_create(&mount)
            .set(resync(|r| r.files_done));
        self.resync_files_planned
            .get_or_create(&mount)
            .set(resync(|r| r.files_total));
        self.resync_done_bytes
            .get_or_create(&mount)
            .set(resync(|r| r.bytes_done));
        self.resync_planned_bytes
            .get_or_create(&mount)
            .set(resync(|r| r.bytes_total));
        self.resync_copied_bytes
            .get_or_create(&mount)
            .inc_by(st.resync_bytes_copied);
        self.uptime.get_or_create(&mount).set(st.uptime_seconds);
    }

    /// A mount in the mount table whose daemon did not answer.
    fn add_unknown(&self, mountpoint: &Path) {
        let mount = Mount {
            mountpoint: mountpoint.display().to_string(),
        };
        self.up.get_or_create(&mount).set(0);
        self.status_code.get_or_create(&mount).set(i64::from(EXIT_UNKNOWN));
    }

    fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
            .expect("formatting into a String cannot fail");
        text
    }
}

/// A new metric, registered under `name` (and `unit`, which the encoder
/// appends to the name).
fn metric<M: Metric + Clone + Default>(r: &mut Registry, name: &str, help: &str, unit: Option<Unit>) -> M {
    let m = M::default();
    match unit {
        Some(unit) => r.register_with_unit(name, help, unit, m.clone()),
        None => r.register(name, help, m.clone()),
    }
    m
}

fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The metrics text for these mounts: each with its status, or without
/// one when its daemon did not answer.
pub fn render(mounts: &[(PathBuf, Option<Status>)]) -> String {
    let m = Metrics::new();
    for (mountpoint, st) in mounts {
        match st {
            Some(st) => m.add(st),
            None => m.add_unknown(mountpoint),
        }
    }
    m.encode()
}

/// `mirrorfs metrics [--output FILE] [MOUNTPOINT]`. Without MOUNTPOINT,
/// every mirrorfs mount. A mount whose daemon does not answer is reported
/// (`mirrorfs_up 0`), not an error; a MOUNTPOINT that is not a mirrorfs
/// mount is. `--output` replaces FILE atomically, as the textfile collector
/// needs.
pub fn run(mountpoint: Option<&Path>, output: Option<&Path>) -> Result<u8, Failure> {
    let mounts: Vec<PathBuf> = match mountpoint {
        Some(m) => {
            let mnt = control::mountpoint_of(m);
            if !mirrorfs_mounts().iter().any(|e| e.mountpoint == mnt) {
                return Err(Failure::Unknown(format!("{} is not a mirrorfs mount", mnt.display())));
            }
            vec![mnt]
        }
        None => mirrorfs_mounts().into_iter().map(|e| e.mountpoint).collect(),
    };
    let statuses: Vec<(PathBuf, Option<Status>)> = mounts
        .into_iter()
        .map(|mnt| {
            let st = control::query_status(&mnt).ok();
            (mnt, st)
        })
        .collect();
    let text = render(&statuses);
    match output {
        None => {
            print!("{text}");
            Ok(0)
        }
        Some(path) => write_atomically(path, text.as_bytes())
            .map(|_| 0)
            .map_err(|e| Failure::Runtime(format!("writing {}: {e}", path.display()))),
    }
}

/// Writes `data` to a temporary file beside `path` and renames it over
/// `path`, so a reader sees the old file or the new one, never half.
fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let r = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.set_permissions(fs::Permissions::from_mode(0o644))?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mount_that_does_not_answer_is_down_and_unknown() {
        let text = render(&[(PathBuf::from("/srv/data"), None)]);
        assert!(text.contains("mirrorfs_up{mountpoint=\"/srv/data\"} 0\n"), "{text}");
        assert!(
            text.contains("mirrorfs_status_code{mountpoint=\"/srv/data\"} 3\n"),
            "{text}"
        );
        assert!(!text.contains("mirrorfs_state{"), "{text}");
    }

    #[test]
    fn no_mounts_give_no_samples() {
        let text = render(&[]);
        assert!(text.lines().all(|l| l.starts_with('#')), "{text}");
    }
}
