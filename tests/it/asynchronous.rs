//! Asynchronous mode (`-o async`): the primary answers, the mirror follows
//! from the change log. Each test ends with the sides identical once the
//! log is drained, except where the primary is lost on purpose.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{BIN, Mounted, noise, ok, run};
use crate::failover::{side_of, status_json};
use crate::faults::{Sshfs, write_synced};

/// Waits until the mirror is up and has every change (lag 0).
fn wait_drained(mnt: &Path, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        // The daemon answers status a moment after the mount appears.
        let out = run(Command::new(BIN).args(["status", "--json"]).arg(mnt));
        let st: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if st["lag_ops"] == 0 && st["sides"].is_array() && side_of(&st, "mirror")["state"] == "UP" {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "the mirror did not catch up in {limit:?}:\n{st:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn events(st: &Value) -> Vec<String> {
    st["last_events"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["event"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Every kind of change the log carries, through the mount.
fn work(m: &Mounted) {
    fs::create_dir_all(m.path("d/e")).unwrap();
    let big = noise((3 << 20) + 123, 1);
    fs::write(m.path("d/big"), &big).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(m.path("d/big")).unwrap();
    f.write_all_at(b"patched", 1 << 20).unwrap();
    f.sync_all().unwrap();
    drop(f);
    for i in 0..100 {
        fs::write(m.path(&format!("d/e/f{i:03}")), i.to_string()).unwrap();
    }
    std::os::unix::fs::symlink("e/f001", m.path("d/link")).unwrap();
    fs::hard_link(m.path("d/big"), m.path("d/big2")).unwrap();
    fs::rename(m.path("d/big2"), m.path("d/e/moved")).unwrap();
    fs::remove_file(m.path("d/e/f000")).unwrap();
    // A name reused at once: the log's order is what keeps them apart.
    fs::rename(m.path("d/e/f002"), m.path("d/e/f002.old")).unwrap();
    fs::write(m.path("d/e/f002"), b"new").unwrap();
    ok(Command::new("setfattr")
        .args(["-n", "user.t", "-v", "v1"])
        .arg(m.path("d/big")));
    ok(Command::new("setfattr")
        .args(["-n", "user.gone", "-v", "x"])
        .arg(m.path("d/big")));
    ok(Command::new("setfattr").args(["-x", "user.gone"]).arg(m.path("d/big")));
    ok(Command::new("chmod").arg("640").arg(m.path("d/e/f003")));
    ok(Command::new("touch")
        .args(["-d", "2021-02-03 04:05:06"])
        .arg(m.path("d/e/f004")));
    ok(Command::new("truncate").args(["-s", "1000"]).arg(m.path("d/e/f005")));
    fs::create_dir(m.path("gone")).unwrap();
    fs::remove_dir(m.path("gone")).unwrap();
    let mut w = OpenOptions::new().append(true).open(m.path("d/e/f006")).unwrap();
    w.write_all(b"+tail").unwrap();
    w.sync_data().unwrap();
}

#[test]
fn async_mode_ships_every_kind_of_change_and_the_sides_end_identical() {
    let test = "async_mode_ships_every_kind_of_change_and_the_sides_end_identical";
    let Some(m) = Mounted::new(test, "async") else {
        return;
    };
    let st = wait_drained(&m.mnt, Duration::from_secs(20));
    assert_eq!(st["mode"], "async", "{st:#}");
    let text = run(Command::new(BIN).arg("status").arg(&m.mnt));
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("mode: async"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );
    work(&m);
    wait_drained(&m.mnt, Duration::from_secs(30));
    m.assert_identical();
    // The mirror's copy is the primary's, byte for byte, data included.
    assert_eq!(
        fs::read(m.mirror.join("d/e/moved")).unwrap(),
        fs::read(m.primary.join("d/big")).unwrap()
    );
    assert_eq!(fs::read(m.mirror.join("d/e/f002")).unwrap(), b"new");
    // The log lives on the primary only, and the position on the mirror.
    assert!(m.primary.join(".mirrorfs/changelog").is_dir());
    assert!(m.mirror.join(".mirrorfs/shipped").is_file());
    assert!(!m.mirror.join(".mirrorfs/changelog").exists());
    m.finish();
}

#[test]
fn a_hung_mirror_holds_writers_at_most_side_timeout_and_shipping_resumes_when_it_is_back() {
    let test = "a_hung_mirror_holds_writers_at_most_side_timeout_and_shipping_resumes_when_it_is_back";
    if !crate::common::fuse_available(test) {
        return;
    }
    let s = Sshfs::new();
    let opts = "async,max_lag=0.5,side_timeout=2,probe_interval=0.5";
    let Some(m) = Mounted::on_sides(test, None, Some(&s.side()), opts) else {
        return;
    };
    let _resume = s.resume_on_drop();
    write_synced(&m.path("before"), b"before").unwrap();
    wait_drained(&m.mnt, Duration::from_secs(20));
    s.hang();
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut i = 0u64;
    while started.elapsed() < Duration::from_secs(5) {
        let t = Instant::now();
        write_synced(&m.path(&format!("during{i}")), &noise(8 << 10, i)).unwrap();
        slowest = slowest.max(t.elapsed());
        i += 1;
    }
    // Held by the lag bound until the stuck shipper passed side_timeout
    // and the mirror went down; never longer.
    assert!(slowest < Duration::from_secs(4), "a write waited {slowest:?}");
    let (_, st) = status_json(&m.mnt);
    assert_eq!(side_of(&st, "mirror")["state"], "DOWN", "{st:#}");
    assert!(st["lag_ops"].as_u64().unwrap_or(0) > 0, "{st:#}");
    assert!(events(&st).contains(&"lag_exceeded".to_string()), "{st:#}");
    s.resume();
    let st = wait_drained(&m.mnt, Duration::from_secs(60));
    assert!(events(&st).contains(&"side_up".to_string()), "{st:#}");
    for j in 0..i {
        assert_eq!(
            fs::read(s.side().join(format!("during{j}"))).unwrap(),
            noise(8 << 10, j),
            "during{j} on the mirror"
        );
    }
    m.finish();
}

#[test]
fn the_primary_lost_with_changes_unshipped_stops_the_mount() {
    let test = "the_primary_lost_with_changes_unshipped_stops_the_mount";
    if !crate::common::fuse_available(test) {
        return;
    }
    // A distant mirror: 20 ms there and back. The primary's fsyncs do not
    // wait for it, so the mirror falls behind a burst of them.
    let s = Sshfs::with_delay(Some(Duration::from_millis(10)));
    let Some(mut m) = Mounted::on_sides(test, None, Some(&s.side()), "async,max_lag=60,side_timeout=30") else {
        return;
    };
    write_synced(&m.path("shipped"), b"shipped").unwrap();
    wait_drained(&m.mnt, Duration::from_secs(30));
    for i in 0..200u64 {
        write_synced(&m.path(&format!("unshipped{i}")), &noise(4096, i)).unwrap();
    }
    let (_, st) = status_json(&m.mnt);
    assert!(st["lag_ops"].as_u64().unwrap_or(0) > 0, "{st:#}");
    ok(Command::new(BIN).arg("fail").arg(&m.mnt).arg("primary"));
    // Nothing is served: the mirror would roll the files back. (A name
    // never looked up reaches the daemon; cached pages would not.)
    let lookup = fs::metadata(m.path("never-looked-up"));
    assert_eq!(lookup.unwrap_err().raw_os_error(), Some(libc::EIO));
    let write = fs::write(m.path("after"), b"x");
    assert_eq!(write.unwrap_err().raw_os_error(), Some(libc::EIO));
    let (code, st) = status_json(&m.mnt);
    assert_eq!(code, 2, "{st:#}");
    assert!(st["lost_ops"].as_u64().unwrap_or(0) > 0, "{st:#}");
    assert!(st["mirror_as_of"].is_string(), "{st:#}");
    let text = run(Command::new(BIN).arg("status").arg(&m.mnt));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("not yet on the mirror") && text.contains("nothing is served"),
        "{text}"
    );
    m.unmount();
    // The mirror holds a state the primary passed through: what was
    // shipped, and no file in part.
    assert_eq!(fs::read(s.side().join("shipped")).unwrap(), b"shipped");
    for i in 0..200u64 {
        if let Ok(data) = fs::read(s.side().join(format!("unshipped{i}"))) {
            assert!(data.is_empty() || data == noise(4096, i), "unshipped{i} is torn");
        }
    }
}

/// A burst of fsync'd writes over a distant mirror leaves it behind.
fn burst(m: &Mounted, n: u64) {
    for i in 0..n {
        write_synced(&m.path(&format!("burst{i}")), &noise(16 << 10, 1000 + i)).unwrap();
    }
}

#[test]
fn killed_with_lag_it_resumes_shipping_from_the_position_or_drains_at_a_sync_mount() {
    let test = "killed_with_lag_it_resumes_shipping_from_the_position_or_drains_at_a_sync_mount";
    if !crate::common::fuse_available(test) {
        return;
    }
    let s = Sshfs::with_delay(Some(Duration::from_millis(10)));
    let Some(mut m) = Mounted::on_sides(test, None, Some(&s.side()), "async,max_lag=60") else {
        return;
    };
    wait_drained(&m.mnt, Duration::from_secs(30));
    burst(&m, 40);
    let (_, st) = status_json(&m.mnt);
    assert!(st["lag_ops"].as_u64().unwrap_or(0) > 0, "{st:#}");
    // Killed with lag, mounted again in async mode: shipping goes on from
    // the mirror's position.
    m.kill9_and_restart("async,max_lag=60");
    wait_drained(&m.mnt, Duration::from_secs(120));
    m.assert_identical();
    burst(&m, 40);
    // Killed with lag, mounted in sync mode: the log is applied first.
    m.kill9_and_restart("");
    let (_, st) = status_json(&m.mnt);
    assert_eq!(st["mode"], "sync", "{st:#}");
    assert!(
        !m.primary.join(".mirrorfs/changelog").exists(),
        "the log was not drained"
    );
    m.assert_identical();
    m.finish();
}

#[test]
fn past_max_log_with_the_mirror_down_the_log_gives_way_to_a_resync() {
    let test = "past_max_log_with_the_mirror_down_the_log_gives_way_to_a_resync";
    let Some(m) = Mounted::new(test, "async,max_log=256K") else {
        return;
    };
    write_synced(&m.path("before"), b"before").unwrap();
    wait_drained(&m.mnt, Duration::from_secs(20));
    ok(Command::new(BIN).arg("fail").arg(&m.mnt).arg("mirror"));
    for i in 0..4u64 {
        write_synced(&m.path(&format!("while-down{i}")), &noise(128 << 10, i)).unwrap();
    }
    assert!(
        !m.primary.join(".mirrorfs/changelog").exists(),
        "the log outgrew max_log and was kept"
    );
    let (_, st) = status_json(&m.mnt);
    assert!(st["pending_paths"].as_u64().unwrap_or(0) > 0, "{st:#}");
    ok(Command::new(BIN).args(["resync", "--wait"]).arg(&m.mnt));
    let (_, st) = status_json(&m.mnt);
    assert_eq!(side_of(&st, "mirror")["state"], "UP", "{st:#}");
    m.assert_identical();
    m.finish();
}
