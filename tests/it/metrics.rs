//! `mirrorfs metrics` against `mirrorfs status --json`: the two agree in
//! every state a mount can be in, and the text passes `promtool check
//! metrics`.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{BIN, Mounted, noise, run_within};
use crate::failover::status_json;
use crate::faults::write_synced;
use crate::resync::split_brain;
use crate::workloads::text;

const LIMIT: Duration = Duration::from_secs(10);

/// Sample name with its labels, as printed, to value.
fn parse(metrics: &str) -> HashMap<String, f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {l}"));
            (
                key.to_string(),
                value.parse().unwrap_or_else(|_| panic!("not a number: {l}")),
            )
        })
        .collect()
}

/// Checks the text with promtool, which must be there under CI=true.
pub(crate) fn promtool_check(metrics: &str) {
    use std::io::Write;
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            let why = format!("promtool cannot run ({e}): the metrics text is not validated (apt install prometheus)");
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{why} -- failing because CI=true"
            );
            eprintln!("WARNING: {why}");
            return;
        }
    };
    child.stdin.take().unwrap().write_all(metrics.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}\n{metrics}",
        text(&out)
    );
}

/// The fields of a status that a state change moves, to see whether two
/// statuses taken around a metrics run saw the same mount.
fn settled(st: &Value) -> Value {
    let sides: Vec<Value> = st["sides"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| serde_json::json!([s["side"], s["state"], s["errors"]]))
        .collect();
    serde_json::json!([
        st["state"],
        sides,
        st["pending_paths"],
        st["events_dropped"],
        st["resync"]["files_total"]
    ])
}

/// Takes status, metrics and status again until both statuses agree, then
/// checks every metric against them. Returns the state seen.
fn assert_agree(mnt: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    let (code, before, metrics, after) = loop {
        let (code, before) = status_json(mnt);
        let out = run_within(Command::new(BIN).arg("metrics").arg(mnt), LIMIT);
        assert!(out.status.success(), "mirrorfs metrics:\n{}", text(&out));
        let (_, after) = status_json(mnt);
        if settled(&before) == settled(&after) {
            break (code, before, String::from_utf8(out.stdout).unwrap(), after);
        }
        assert!(Instant::now() < deadline, "the mount never held still for 30 s");
    };
    promtool_check(&metrics);
    let got = parse(&metrics);
    let m = mnt.display().to_string();
    let value = |key: String| *got.get(&key).unwrap_or_else(|| panic!("no {key} in:\n{metrics}"));
    let bool_of = |b: bool| if b { 1.0 } else { 0.0 };
    let state = before["state"].as_str().unwrap().to_string();
    let why = format!("status before:\n{before:#}\nmetrics:\n{metrics}");
    assert_eq!(value(format!("mirrorfs_up{{mountpoint=\"{m}\"}}")), 1.0, "{why}");
    assert_eq!(
        value(format!("mirrorfs_status_code{{mountpoint=\"{m}\"}}")),
        f64::from(code),
        "{why}"
    );
    for s in ["HEALTHY", "RESYNCING", "DEGRADED", "SPLIT"] {
        let key = format!("mirrorfs_state{{mountpoint=\"{m}\",state=\"{s}\"}}");
        assert_eq!(value(key), bool_of(state == s), "state {s}: {why}");
    }
    for side in before["sides"].as_array().unwrap() {
        let name = side["side"].as_str().unwrap();
        for s in ["UP", "DOWN", "RESYNCING", "OFF"] {
            let key = format!("mirrorfs_side_state{{mountpoint=\"{m}\",side=\"{name}\",state=\"{s}\"}}");
            assert_eq!(value(key), bool_of(side["state"] == s), "{name} {s}: {why}");
        }
        for class in ["read", "write", "other"] {
            let key = format!("mirrorfs_side_errors_total{{mountpoint=\"{m}\",side=\"{name}\",class=\"{class}\"}}");
            assert_eq!(
                value(key),
                side["errors"][class].as_f64().unwrap(),
                "{name} {class}: {why}"
            );
        }
    }
    for (metric, field) in [
        ("mirrorfs_pending_paths", "pending_paths"),
        ("mirrorfs_events_dropped_total", "events_dropped"),
    ] {
        let key = format!("{metric}{{mountpoint=\"{m}\"}}");
        assert_eq!(value(key), before[field].as_f64().unwrap(), "{metric}: {why}");
    }
    // Figures that grow while the mount holds still: between the two statuses.
    let within = |metric: &str, at: &dyn Fn(&Value) -> f64| {
        let v = value(format!("{metric}{{mountpoint=\"{m}\"}}"));
        assert!(
            at(&before) <= v && v <= at(&after),
            "{metric} {v} not between {} and {}: {why}",
            at(&before),
            at(&after)
        );
    };
    let resync = |field: &'static str| move |st: &Value| st["resync"][field].as_f64().unwrap_or(0.0);
    within("mirrorfs_resync_files_done", &resync("files_done"));
    within("mirrorfs_resync_files_planned", &resync("files_total"));
    within("mirrorfs_resync_done_bytes", &resync("bytes_done"));
    within("mirrorfs_resync_planned_bytes", &resync("bytes_total"));
    within("mirrorfs_resync_copied_bytes_total", &|st| {
        st["resync_bytes_copied"].as_f64().unwrap()
    });
    within("mirrorfs_uptime_seconds", &|st| st["uptime_seconds"].as_f64().unwrap());
    state
}

fn mirrorfs_ok(args: &[&str], mnt: &Path) {
    let out = run_within(Command::new(BIN).args(args).arg(mnt), LIMIT);
    assert!(out.status.success(), "mirrorfs {args:?}:\n{}", text(&out));
}

#[test]
fn status_and_metrics_agree_in_every_state() {
    let test = "status_and_metrics_agree_in_every_state";
    let Some(mut m) = Mounted::new(test, "noautoresync,probe_interval=1") else {
        return;
    };
    assert_eq!(assert_agree(&m.mnt), "HEALTHY");

    // RESYNCING lasts as long as the copy of what the mirror missed: make
    // it big enough to be seen, and more so on each try.
    let mut seen = Vec::new();
    for attempt in 0..4u64 {
        let out = run_within(Command::new(BIN).arg("fail").arg(&m.mnt).arg("mirror"), LIMIT);
        assert!(out.status.success(), "mirrorfs fail:\n{}", text(&out));
        seen.push(assert_agree(&m.mnt));
        let mib = 64usize << attempt;
        for i in 0..mib / 16 {
            write_synced(&m.path(&format!("big{i}")), &noise(16 << 20, attempt * 1000 + i as u64)).unwrap();
        }
        mirrorfs_ok(&["resync"], &m.mnt);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let state = assert_agree(&m.mnt);
            seen.push(state.clone());
            if state == "HEALTHY" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not HEALTHY 120 s after the resync began: {seen:?}"
            );
        }
        if seen.iter().any(|s| s == "RESYNCING") {
            break;
        }
    }
    println!("states seen: {seen:?}");
    assert!(seen.iter().any(|s| s == "DEGRADED"), "{seen:?}");
    assert!(seen.iter().any(|s| s == "RESYNCING"), "never saw RESYNCING: {seen:?}");

    split_brain(&mut m, "");
    assert_eq!(assert_agree(&m.mnt), "SPLIT");
    let out = run_within(
        Command::new(BIN)
            .args(["resync", "--wait", "--from", "mirror"])
            .arg(&m.mnt),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "resync --from mirror:\n{}", text(&out));
    m.unmount();
    m.assert_identical();
}
