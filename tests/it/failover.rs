//! A side that fails with a real kernel error (see `faults`) is taken out
//! of service: the caller sees no error, `mirrorfs status` and the event log
//! say which side went down, when and why, and the survivor records the side
//! as stale. Also the failover options (noswitch, mirror_skip, mirrors=off,
//! side_timeout, hook), `fail` by hand, and PostgreSQL through a failure.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{
    BIN, Mounted, fuse_available, is_mounted, noise, ok, open_tempdir, run, run_within, unmount_or_detach,
};
use crate::faults::{ReadOnly, SmallTmpfs, Sshfs, XfsShutdown, Zram, ZramMount, assert_same, write_synced};
use crate::workloads::{PgServer, PgbenchOutcome, as_postgres, assert_checksums, chown_postgres_0700, text};

#[test]
fn mirror_enospc_takes_the_mirror_out_and_writes_go_on() {
    let Some(mut m) = Mounted::with_mirror_tmpfs("mirror_enospc_takes_the_mirror_out_and_writes_go_on", "", Some("1m"))
    else {
        return;
    };
    let chunk = vec![0xabu8; 64 << 10];
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(m.path("log"))
        .unwrap();
    // 4 MiB of fsync'd appends: the 1 MiB mirror fills up part way through.
    for _ in 0..64 {
        f.write_all(&chunk).expect("write through the mount must not fail");
        f.sync_data().expect("fsync through the mount must not fail");
    }
    drop(f);
    fs::write(m.path("after"), b"still writable").unwrap();
    assert_eq!(fs::read(m.path("log")).unwrap().len(), 64 * chunk.len());
    assert_eq!(fs::read(m.primary.join("log")).unwrap().len(), 64 * chunk.len());
    assert_eq!(fs::read(m.primary.join("after")).unwrap(), b"still writable");
    assert!(!m.mirror.join("after").exists(), "the mirror is out of service");
    m.unmount();
    let state = fs::read_to_string(m.primary.join(".mirrorfs/state.json")).expect("stale mirror recorded");
    assert!(
        state.contains("\"stale\": \"mirror\"") && state.contains("ENOSPC"),
        "{state}"
    );
    // A stale mirror no longer stops a read-write mount: the mount starts
    // with it DOWN and catches it up at once. 4 MiB cannot fit into the
    // 1 MiB tmpfs, so that resync fails and the mirror is DOWN again, while
    // the primary serves everything.
    m.try_remount("").expect("a read-write mount with a stale mirror");
    let t0 = Instant::now();
    let (code, st) = loop {
        let (code, st) = status_json(&m.mnt);
        let last = &st["last_resync"];
        if last["side"] == "mirror" && last["ok"] == false && side_of(&st, "mirror")["state"] == "DOWN" {
            break (code, st);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no failed resync of the mirror within 60 s of the mount:\n{st:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(code, 2, "DEGRADED expected after the failed resync:\n{st:#}");
    assert_eq!(st["state"], "DEGRADED", "{st:#}");
    assert_eq!(side_of(&st, "primary")["state"], "UP", "{st:#}");
    let evs = events(&m.mnt);
    assert!(
        evs.iter().any(|e| e["event"] == "resync_done"
            && e["side"] == "mirror"
            && e["detail"].as_str().is_some_and(|d| d.starts_with("failed"))),
        "no failed resync_done event for the mirror:\n{evs:#?}"
    );
    assert_eq!(fs::read(m.path("log")).unwrap(), vec![0xabu8; 64 * chunk.len()]);
    assert_eq!(fs::read(m.path("after")).unwrap(), b"still writable");
    m.unmount();
    assert_eq!(fs::read(m.primary.join("log")).unwrap(), vec![0xabu8; 64 * chunk.len()]);
    assert_eq!(fs::read(m.primary.join("after")).unwrap(), b"still writable");
    let state = fs::read_to_string(m.primary.join(".mirrorfs/state.json")).expect("state.json");
    assert!(
        state.contains("\"stale\": \"mirror\""),
        "the mirror is still stale: {state}"
    );
}

// ---------------------------------------------------------------- status, events, fail

pub(crate) const CMD_LIMIT: Duration = Duration::from_secs(10);

/// `mirrorfs status MOUNTPOINT`: exit code and text.
fn status(mnt: &Path) -> (i32, String) {
    let out = run_within(Command::new(BIN).arg("status").arg(mnt), CMD_LIMIT);
    (out.status.code().unwrap_or(-1), text(&out))
}

/// `mirrorfs status --json MOUNTPOINT`: exit code and the object.
pub(crate) fn status_json(mnt: &Path) -> (i32, Value) {
    let out = run_within(Command::new(BIN).args(["status", "--json"]).arg(mnt), CMD_LIMIT);
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json {}: not JSON ({e}):\n{}", mnt.display(), text(&out)));
    (out.status.code().unwrap_or(-1), v)
}

/// The entry for `side` ("primary" or "mirror") in a status object.
pub(crate) fn side_of<'a>(st: &'a Value, side: &str) -> &'a Value {
    st["sides"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["side"] == side))
        .unwrap_or_else(|| panic!("no {side} in status:\n{st:#}"))
}

/// `mirrorfs events --json MOUNTPOINT`: one object per line.
pub(crate) fn events(mnt: &Path) -> Vec<Value> {
    let out = run_within(Command::new(BIN).args(["events", "--json"]).arg(mnt), CMD_LIMIT);
    assert!(out.status.success(), "events --json {}:\n{}", mnt.display(), text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("event line not JSON ({e}): {l}")))
        .collect()
}

/// The first event named `name` with all `fields` equal, if any.
fn find_event<'a>(evs: &'a [Value], name: &str, fields: &[(&str, &str)]) -> Option<&'a Value> {
    evs.iter()
        .find(|e| e["event"] == name && fields.iter().all(|(k, v)| e[*k] == *v))
}

/// Polls `status --json` until `side` is DOWN; returns how long that took.
fn wait_down(mnt: &Path, side: &str, limit: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let (_, st) = status_json(mnt);
        if side_of(&st, side)["state"] == "DOWN" {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < limit, "{side} not DOWN after {limit:?}:\n{st:#}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts that `side` is DOWN with `errno`, in text and JSON status (exit 2,
/// DEGRADED, a reason given) and in a side_down event; the other side is UP.
fn assert_down(mnt: &Path, side: &str, errno: &str) {
    let other = if side == "mirror" { "primary" } else { "mirror" };
    let (code, txt) = status(mnt);
    assert_eq!(code, 2, "status exit code, DEGRADED expected:\n{txt}");
    assert!(txt.contains("state: DEGRADED"), "{txt}");
    let line = txt
        .lines()
        .find(|l| l.trim_start().starts_with(side))
        .unwrap_or_else(|| panic!("no line for the {side}:\n{txt}"));
    assert!(
        line.contains("DOWN") && line.contains(errno),
        "{side} line should say DOWN and {errno}:\n{txt}"
    );
    let (code, st) = status_json(mnt);
    assert_eq!(code, 2, "{st:#}");
    assert_eq!(st["state"], "DEGRADED", "{st:#}");
    assert_eq!(st["mountpoint"], mnt.to_str().unwrap(), "{st:#}");
    let s = side_of(&st, side);
    assert_eq!(s["state"], "DOWN", "{st:#}");
    assert_eq!(s["errno"], errno, "{st:#}");
    assert!(s["since"].is_string() && s["op"].is_string(), "{st:#}");
    assert!(
        s["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "no reason for the {side}:\n{st:#}"
    );
    let errors = &s["errors"];
    let count = |k: &str| errors[k].as_u64().unwrap_or_else(|| panic!("errors.{k}:\n{st:#}"));
    assert!(
        count("read") + count("write") + count("other") > 0,
        "no error counted for the {side}:\n{st:#}"
    );
    assert_eq!(side_of(&st, other)["state"], "UP", "{st:#}");
    assert!(
        st["pid"].is_u64() && st["pending_paths"].is_u64() && st["last_events"].is_array(),
        "{st:#}"
    );
    assert_eq!(st["events_dropped"], 0, "{st:#}");
    let evs = events(mnt);
    assert!(
        find_event(&evs, "side_down", &[("side", side), ("errno", errno)]).is_some(),
        "no side_down event for the {side} with {errno}:\n{evs:#?}"
    );
}

/// Load through the mount until stopped: one thread appends 4 KiB records
/// (record i is `noise(4096, i)`), each fsync'd; another writes, fsyncs and
/// reads back whole files `files/f<i>`. Every error is kept.
struct Load {
    stop: Arc<AtomicBool>,
    records: Arc<AtomicU64>,
    files: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Vec<String>>>,
}

const RECORD: usize = 4096;

fn file_data(i: u64) -> Vec<u8> {
    noise(8192 + (i as usize % 7) * 1000, 1_000_000 + i)
}

impl Load {
    fn start(mnt: &Path) -> Load {
        fs::create_dir(mnt.join("files")).expect("mkdir files");
        let stop = Arc::new(AtomicBool::new(false));
        let (records, files) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut threads = Vec::new();
        let (s, n, log) = (stop.clone(), records.clone(), mnt.join("log"));
        threads.push(std::thread::spawn(move || {
            let mut errors = Vec::new();
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .expect("open log");
            while !s.load(Ordering::Relaxed) {
                let i = n.load(Ordering::Relaxed);
                match f.write_all(&noise(RECORD, i)).and_then(|_| f.sync_data()) {
                    Ok(()) => {
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        errors.push(format!("append record {i}: {e}"));
                        break;
                    }
                }
            }
            errors
        }));
        let (s, n, dir) = (stop.clone(), files.clone(), mnt.join("files"));
        threads.push(std::thread::spawn(move || {
            let mut errors = Vec::new();
            while !s.load(Ordering::Relaxed) && errors.is_empty() {
                let i = n.load(Ordering::Relaxed);
                let p = dir.join(format!("f{i}"));
                let want = file_data(i);
                match write_synced(&p, &want).and_then(|_| fs::read(&p)) {
                    Ok(got) if got == want => {
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(got) => errors.push(format!("f{i} read back {} bytes that differ", got.len())),
                    Err(e) => errors.push(format!("f{i}: {e}")),
                }
            }
            errors
        }));
        Load {
            stop,
            records,
            files,
            threads,
        }
    }

    /// Records and files acknowledged so far.
    fn progress(&self) -> (u64, u64) {
        (self.records.load(Ordering::Relaxed), self.files.load(Ordering::Relaxed))
    }

    /// Stops the threads; returns (records, files) and asserts no errors.
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let errors: Vec<String> = self
            .threads
            .drain(..)
            .flat_map(|t| t.join().expect("load thread"))
            .collect();
        assert!(errors.is_empty(), "the load saw errors:\n{errors:#?}");
        self.progress()
    }

    /// Checks everything acknowledged under `root` (the mount or a side).
    fn check(root: &Path, (records, files): (u64, u64)) {
        let log = fs::read(root.join("log")).unwrap_or_else(|e| panic!("{}/log: {e}", root.display()));
        assert!(
            log.len() as u64 >= records * RECORD as u64,
            "{}/log: {} bytes, {records} records acknowledged",
            root.display(),
            log.len()
        );
        for i in 0..records {
            let at = i as usize * RECORD;
            assert_same(
                &log[at..at + RECORD],
                &noise(RECORD, i),
                &format!("{}/log record {i}", root.display()),
            );
        }
        for i in 0..files {
            let p = root.join(format!("files/f{i}"));
            let got = fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert_same(&got, &file_data(i), &p.display().to_string());
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs `Load` through the mount, calls `fault`, waits for `side` to go
/// DOWN (printing how long that took), lets the load go on for a second
/// and checks that it saw no error and made progress after the fault.
fn load_through_fault(mnt: &Path, side: &str, what: &str, fault: impl FnOnce()) -> (u64, u64) {
    let load = Load::start(mnt);
    std::thread::sleep(Duration::from_secs(1));
    let before = load.progress();
    assert!(before.0 > 0 && before.1 > 0, "no progress before the fault: {before:?}");
    fault();
    let took = wait_down(mnt, side, Duration::from_secs(30));
    eprintln!(
        "{what}: status showed the {side} DOWN {:.3} s after the fault",
        took.as_secs_f64()
    );
    let at_down = load.progress();
    std::thread::sleep(Duration::from_secs(1));
    let done = load.finish();
    assert!(
        done.0 > at_down.0 && done.1 > at_down.1,
        "no progress after the {side} went down: {before:?} -> {at_down:?} -> {done:?}"
    );
    eprintln!("{what}: {} records and {} files acknowledged", done.0, done.1);
    done
}

#[test]
fn mirror_eio_under_load_goes_unnoticed_and_is_reported() {
    let test = "mirror_eio_under_load_goes_unnoticed_and_is_reported";
    if !fuse_available(test) {
        return;
    }
    let z = Zram::new("256M", ZramMount::Sync);
    let mut m = Mounted::on_sides(test, None, Some(&z.side()), "").unwrap();
    let done = load_through_fault(&m.mnt, "mirror", "mirror zram EIO", || z.fail());
    assert_down(&m.mnt, "mirror", "EIO");
    let (_, st) = status_json(&m.mnt);
    let reason = side_of(&st, "mirror")["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("EIO"), "the reason should name EIO: {reason}");
    Load::check(&m.mnt, done);
    m.unmount();
    Load::check(&m.primary, done);
    // The zram still fails. A stale mirror no longer stops a read-write
    // mount: it starts with the mirror DOWN; catching it up cannot write to
    // it (nor can its probe), so it stays DOWN and the primary serves.
    m.try_remount("")
        .expect("a read-write mount with the stale, still failing mirror");
    let t0 = Instant::now();
    let st = loop {
        let (_, st) = status_json(&m.mnt);
        let mirror = side_of(&st, "mirror");
        let tried = (st["last_resync"]["side"] == "mirror" && st["last_resync"]["ok"] == false)
            || mirror["probe"]["answered"] == false;
        if tried && mirror["state"] == "DOWN" {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no failed resync or probe of the mirror within 30 s of the mount:\n{st:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("remount with the mirror still failing: {st:#}");
    let (code, st) = status_json(&m.mnt);
    assert_eq!(code, 2, "DEGRADED expected:\n{st:#}");
    assert_eq!(st["state"], "DEGRADED", "{st:#}");
    assert_eq!(side_of(&st, "mirror")["state"], "DOWN", "{st:#}");
    assert_eq!(side_of(&st, "primary")["state"], "UP", "{st:#}");
    Load::check(&m.mnt, done);
    m.unmount();
    Load::check(&m.primary, done);
}

#[test]
fn primary_eio_under_load_switches_to_the_mirror() {
    let test = "primary_eio_under_load_switches_to_the_mirror";
    if !fuse_available(test) {
        return;
    }
    let z = Zram::new("256M", ZramMount::Sync);
    let mut m = Mounted::on_sides(test, Some(&z.side()), None, "").unwrap();
    // A descriptor opened before the failure, used after it.
    let held = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path("held"))
        .unwrap();
    let first = noise(64 << 10, 7);
    held.write_all_at(&first, 0).unwrap();
    held.sync_all().unwrap();
    let done = load_through_fault(&m.mnt, "primary", "primary zram EIO", || z.fail());
    let second = noise(64 << 10, 8);
    held.write_all_at(&second, first.len() as u64)
        .expect("write through an fd opened before the failure");
    held.sync_all().expect("fsync through an fd opened before the failure");
    let mut both_parts = first.clone();
    both_parts.extend_from_slice(&second);
    let mut back = vec![0u8; both_parts.len()];
    held.read_exact_at(&mut back, 0).expect("read through the old fd");
    assert_same(&back, &both_parts, "held, read through the old fd");
    assert_same(
        &fs::read(m.path("held")).unwrap(),
        &both_parts,
        "held, read through a new fd",
    );
    assert_down(&m.mnt, "primary", "EIO");
    Load::check(&m.mnt, done);
    drop(held);
    m.unmount();
    Load::check(&m.mirror, done);
    assert_same(
        &fs::read(m.mirror.join("held")).unwrap(),
        &both_parts,
        "held on the mirror",
    );
}

/// Writes before and after a mirror fault, checks that the fault is reported
/// with `errno` and that everything acknowledged is on the primary.
fn mirror_fault_is_reported(test: &str, mirror: &Path, errno: &str, fault: impl FnOnce(&Path)) {
    let Some(mut m) = Mounted::on_sides(test, None, Some(mirror), "") else {
        return;
    };
    let mut written = Vec::new();
    for i in 0..4u64 {
        let name = format!("before{i}");
        write_synced(&m.path(&name), &noise(32 << 10, i)).unwrap();
        written.push((name, noise(32 << 10, i)));
    }
    let mut held = OpenOptions::new().append(true).open(m.path("before0")).unwrap();
    fault(&m.mnt);
    for i in 0..8u64 {
        let name = format!("after{i}");
        let data = noise(64 << 10, 100 + i);
        write_synced(&m.path(&name), &data).unwrap_or_else(|e| panic!("{test}: write {name} after the fault: {e}"));
        written.push((name, data));
    }
    held.write_all(b"tail")
        .expect("append through an fd opened before the fault");
    held.sync_all().expect("fsync through an fd opened before the fault");
    written[0].1.extend_from_slice(b"tail");
    fs::create_dir(m.path("dir-after")).expect("mkdir after the fault");
    wait_down(&m.mnt, "mirror", Duration::from_secs(10));
    assert_down(&m.mnt, "mirror", errno);
    for (name, data) in &written {
        assert_same(&fs::read(m.path(name)).unwrap(), data, name);
    }
    drop(held);
    m.unmount();
    for (name, data) in &written {
        assert_same(
            &fs::read(m.primary.join(name)).unwrap(),
            data,
            &format!("primary {name}"),
        );
    }
    assert!(m.primary.join("dir-after").is_dir());
}

#[test]
fn mirror_enospc_is_reported() {
    if !fuse_available("mirror_enospc_is_reported") {
        return;
    }
    let t = SmallTmpfs::new("2m");
    mirror_fault_is_reported("mirror_enospc_is_reported", &t.side(), "ENOSPC", |mnt| {
        write_synced(&mnt.join("big"), &noise(4 << 20, 99)).expect("4 MiB with a 2 MiB mirror");
    });
}

#[test]
fn mirror_erofs_is_reported() {
    if !fuse_available("mirror_erofs_is_reported") {
        return;
    }
    // ext4 turning itself read-only after an error: a plain `remount,ro` is
    // refused while mirrorfs holds a file open for writing on the side.
    let r = ReadOnly::new();
    mirror_fault_is_reported("mirror_erofs_is_reported", &r.side(), "EROFS", |_| r.force_ro());
}

#[test]
fn mirror_sshfs_dying_is_reported() {
    if !fuse_available("mirror_sshfs_dying_is_reported") {
        return;
    }
    let s = Sshfs::new();
    mirror_fault_is_reported("mirror_sshfs_dying_is_reported", &s.side(), "ENOTCONN", |_| s.kill());
}

#[test]
fn mirror_xfs_shutdown_is_reported() {
    if !fuse_available("mirror_xfs_shutdown_is_reported") {
        return;
    }
    let x = XfsShutdown::new();
    mirror_fault_is_reported("mirror_xfs_shutdown_is_reported", &x.side(), "EIO", |_| x.shutdown());
}

/// Runs `f` in a helper thread; its result, or None if it has not returned
/// within `limit` (the thread is then left blocked; the test's cleanup
/// releases it).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<(T, Duration)> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let t0 = Instant::now();
        let r = f();
        let _ = tx.send((r, t0.elapsed()));
    });
    rx.recv_timeout(limit).ok()
}

#[test]
fn hung_mirror_times_out_and_unmount_still_works() {
    let test = "hung_mirror_times_out_and_unmount_still_works";
    if !fuse_available(test) {
        return;
    }
    let s = Sshfs::new();
    let mut m = Mounted::on_sides(test, None, Some(&s.side()), "side_timeout=2").unwrap();
    let _resume = s.resume_on_drop();
    write_synced(&m.path("before"), &noise(32 << 10, 1)).unwrap();
    s.hang();
    let p = m.path("during");
    let (r, took) = within(Duration::from_secs(8), move || write_synced(&p, &noise(32 << 10, 2)))
        .expect("an fsync'd write with the mirror hung did not finish within 8 s (side_timeout=2)");
    r.expect("write with the mirror hung");
    eprintln!("hung mirror: fsync'd write answered after {:.2} s", took.as_secs_f64());
    assert_down(&m.mnt, "mirror", "ETIMEDOUT");
    // Other requests keep being answered.
    let mnt = m.mnt.clone();
    let (r, took) = within(Duration::from_secs(5), move || -> io::Result<()> {
        fs::metadata(mnt.join("before"))?;
        assert_same(&fs::read(mnt.join("before"))?, &noise(32 << 10, 1), "before");
        write_synced(&mnt.join("after"), &noise(32 << 10, 3))?;
        fs::read_dir(&mnt)?.count();
        Ok(())
    })
    .expect("stat/read/write/readdir with the mirror down and hung took over 5 s");
    r.expect("requests after the timeout");
    eprintln!("hung mirror: stat, read, write, readdir in {:.3} s", took.as_secs_f64());
    let t0 = Instant::now();
    let out = run_within(Command::new(BIN).arg("unmount").arg(&m.mnt), Duration::from_secs(20));
    assert!(out.status.success(), "unmount with the mirror hung:\n{}", text(&out));
    assert!(!is_mounted(&m.mnt), "the mount is gone while the mirror still hangs");
    eprintln!("hung mirror: unmount took {:.2} s", t0.elapsed().as_secs_f64());
    // The daemon process itself ends only once the hung side answers: the
    // kernel closes its files on that side at exit, and FUSE's FLUSH on
    // close cannot be interrupted. That is any process's lot on a hung
    // network mount; the mount and its users are not held up.
    s.resume();
    m.unmount();
    assert_same(
        &fs::read(m.primary.join("during")).unwrap(),
        &noise(32 << 10, 2),
        "during",
    );
    assert_same(
        &fs::read(m.primary.join("after")).unwrap(),
        &noise(32 << 10, 3),
        "after",
    );
}

#[test]
fn hung_primary_times_out_and_reads_and_writes_go_to_the_mirror() {
    let test = "hung_primary_times_out_and_reads_and_writes_go_to_the_mirror";
    if !fuse_available(test) {
        return;
    }
    let s = Sshfs::new();
    let mut m = Mounted::on_sides(test, Some(&s.side()), None, "side_timeout=2").unwrap();
    let _resume = s.resume_on_drop();
    write_synced(&m.path("before"), &noise(32 << 10, 1)).unwrap();
    // Opened before the hang: the handle goes on through the mirror.
    let held = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("before"))
        .unwrap();
    s.hang();
    let p = m.path("during");
    let (r, took) = within(Duration::from_secs(8), move || write_synced(&p, &noise(32 << 10, 2)))
        .expect("an fsync'd write with the primary hung did not finish within 8 s (side_timeout=2)");
    r.expect("write with the primary hung");
    eprintln!("hung primary: fsync'd write answered after {:.2} s", took.as_secs_f64());
    assert_down(&m.mnt, "primary", "ETIMEDOUT");
    let mnt = m.mnt.clone();
    let (r, took) = within(Duration::from_secs(5), move || -> io::Result<()> {
        assert_same(&fs::read(mnt.join("before"))?, &noise(32 << 10, 1), "before");
        assert_same(&fs::read(mnt.join("during"))?, &noise(32 << 10, 2), "during");
        fs::read_dir(&mnt)?.count();
        Ok(())
    })
    .expect("reads with the primary down and hung took over 5 s");
    r.expect("reads after the timeout");
    eprintln!("hung primary: reads in {:.3} s", took.as_secs_f64());
    held.write_all_at(b"still writable", 0).unwrap();
    held.sync_all().unwrap();
    drop(held);
    let out = run_within(Command::new(BIN).arg("unmount").arg(&m.mnt), Duration::from_secs(20));
    assert!(out.status.success(), "unmount with the primary hung:\n{}", text(&out));
    assert!(!is_mounted(&m.mnt));
    // See the hung-mirror test: the daemon ends once the side answers.
    s.resume();
    m.unmount();
    let mut want = noise(32 << 10, 1);
    want[..14].copy_from_slice(b"still writable");
    assert_same(
        &fs::read(m.mirror.join("before")).unwrap(),
        &want,
        "before, on the mirror",
    );
    assert_same(
        &fs::read(m.mirror.join("during")).unwrap(),
        &noise(32 << 10, 2),
        "during, on the mirror",
    );
}

#[test]
fn noswitch_returns_eio_and_reports_the_side() {
    let test = "noswitch_returns_eio_and_reports_the_side";
    if !fuse_available(test) {
        return;
    }
    let t = SmallTmpfs::new("1m");
    let mut m = Mounted::on_sides(test, None, Some(&t.side()), "noswitch").unwrap();
    write_synced(&m.path("before"), b"before").unwrap();
    let mut f = File::create(m.path("big")).unwrap();
    let mut err = None;
    for i in 0..64 {
        if let Err(e) = f.write_all(&noise(64 << 10, i)).and_then(|_| f.sync_data()) {
            err = Some(e);
            break;
        }
    }
    let err = err.expect("4 MiB into a 1 MiB mirror with noswitch: no error");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    drop(f);
    assert_down(&m.mnt, "mirror", "ENOSPC");
    let later = fs::write(m.path("later"), b"x");
    assert_eq!(
        later.as_ref().err().and_then(|e| e.raw_os_error()),
        Some(libc::EIO),
        "a change with a side down under noswitch: {later:?}"
    );
    assert_eq!(fs::read(m.path("before")).expect("reads are served"), b"before");
    m.unmount();
    assert_eq!(fs::read(m.primary.join("before")).unwrap(), b"before");
}

#[test]
fn mirror_skip_mounts_without_the_mirror() {
    let test = "mirror_skip_mounts_without_the_mirror";
    if !fuse_available(test) {
        return;
    }
    let t = open_tempdir();
    let (primary, mnt) = (t.path().join("primary"), t.path().join("mnt"));
    fs::create_dir(&primary).unwrap();
    fs::create_dir(&mnt).unwrap();
    let absent = t.path().join("absent/mirror");
    let spec = format!("{}|{}", primary.display(), absent.display());
    let out = run_within(
        Command::new(BIN).args(["mount", &spec]).arg(&mnt),
        Duration::from_secs(20),
    );
    let refused = !out.status.success();
    if !refused {
        unmount_or_detach(&mnt);
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(refused, "mounted with the mirror missing and no mirror_skip");
    assert!(err.contains("mirror") && err.contains("mirror_skip"), "{err}");

    let Some(mut m) = Mounted::on_sides(test, Some(&primary), Some(&absent), "mirror_skip") else {
        return;
    };
    let (code, txt) = status(&m.mnt);
    assert_eq!(code, 2, "{txt}");
    assert!(txt.contains("state: DEGRADED"), "{txt}");
    let (_, st) = status_json(&m.mnt);
    assert_eq!(side_of(&st, "mirror")["state"], "DOWN", "{st:#}");
    assert_eq!(side_of(&st, "primary")["state"], "UP", "{st:#}");
    let evs = events(&m.mnt);
    assert!(
        find_event(&evs, "mirror_skip", &[("side", "mirror")]).is_some(),
        "no mirror_skip event naming the mirror:\n{evs:#?}"
    );
    write_synced(&m.path("f"), b"data").expect("write on a mirror_skip mount");
    m.unmount();
    assert_eq!(fs::read(primary.join("f")).unwrap(), b"data");
    assert!(!absent.exists(), "mirror_skip must not create the mirror");
}

#[test]
fn read_only_mount_serves_the_mirror_when_the_primary_is_missing() {
    let test = "read_only_mount_serves_the_mirror_when_the_primary_is_missing";
    let Some(mut m) = Mounted::new(test, "") else {
        return;
    };
    fs::write(m.path("kept"), b"data").unwrap();
    m.unmount();
    m.assert_identical();
    fs::rename(&m.primary, m.dir.path().join("primary.away")).unwrap();
    m.try_remount("ro").expect("read-only mount with the primary missing");
    let read = fs::read(m.path("kept"));
    let write = fs::write(m.path("new"), b"x");
    let (code, txt) = status(&m.mnt);
    m.unmount();
    assert_eq!(read.expect("read with the primary missing"), b"data");
    assert_eq!(write.unwrap_err().raw_os_error(), Some(libc::EROFS));
    assert_eq!(code, 2, "one side missing is DEGRADED:\n{txt}");
    assert!(!m.mirror.join("new").exists());
}

/// `mirrorfs ARGS...` run as user nobody.
fn as_nobody(args: &[&str]) -> Output {
    run_within(
        Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
            .arg(BIN)
            .args(args)
            .current_dir("/"),
        CMD_LIMIT,
    )
}

#[test]
fn status_for_anyone_fail_for_root_only() {
    let test = "status_for_anyone_fail_for_root_only";
    let Some(mut m) = Mounted::new(test, "") else {
        return;
    };
    let mnt = m.mnt.to_str().unwrap();
    let out = as_nobody(&["status", mnt]);
    assert_eq!(out.status.code(), Some(0), "status as nobody:\n{}", text(&out));
    assert!(text(&out).contains("state: HEALTHY"), "{}", text(&out));

    let plain = open_tempdir();
    let (code, txt) = status(plain.path());
    assert_eq!(code, 3, "status of a plain directory:\n{txt}");

    let out = run_within(Command::new(BIN).args(["status", "--json"]), CMD_LIMIT);
    let all: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json: not JSON ({e}):\n{}", text(&out)));
    let mine = all
        .as_array()
        .and_then(|a| a.iter().find(|s| s["mountpoint"] == m.mnt.to_str().unwrap()))
        .unwrap_or_else(|| panic!("status --json does not list {}:\n{all:#}", m.mnt.display()));
    assert_eq!(mine["state"], "HEALTHY", "{all:#}");
    assert_eq!(mine["pid"], m.daemon_pid().unwrap(), "{all:#}");

    let out = as_nobody(&["fail", mnt, "mirror"]);
    assert_eq!(out.status.code(), Some(1), "fail as nobody:\n{}", text(&out));
    assert!(text(&out).contains("permission"), "{}", text(&out));
    assert_eq!(status(&m.mnt).0, 0, "fail as nobody must change nothing");

    // Follow the events while the mirror is taken out by hand.
    let mut follow = std::process::Command::new(BIN)
        .args(["events", "--json", "--follow"])
        .arg(&m.mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("events --follow");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let out = run_within(Command::new(BIN).arg("fail").arg(&m.mnt).arg("mirror"), CMD_LIMIT);
    assert!(out.status.success(), "fail as root:\n{}", text(&out));
    let deadline = Instant::now() + Duration::from_secs(10);
    let followed = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            break None;
        };
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("--follow line not JSON ({e}): {line}"));
        if v["event"] == "side_down" {
            break Some(v);
        }
    };
    let _ = follow.kill();
    let _ = follow.wait();
    let followed = followed.expect("events --follow showed no side_down within 10 s");
    assert_eq!(followed["side"], "mirror", "{followed}");
    assert_eq!(followed["op"], "fail", "{followed}");

    let (code, st) = status_json(&m.mnt);
    assert_eq!(code, 2, "{st:#}");
    assert_eq!(side_of(&st, "mirror")["state"], "DOWN", "{st:#}");
    assert_eq!(side_of(&st, "mirror")["op"], "fail", "{st:#}");
    let evs = events(&m.mnt);
    let ev = find_event(&evs, "side_down", &[("side", "mirror"), ("op", "fail")])
        .unwrap_or_else(|| panic!("no side_down op=fail event:\n{evs:#?}"));
    let time = ev["time"].as_str().unwrap_or_default();
    assert!(ev["seq"].is_u64() && time.len() == 24 && time.ends_with('Z'), "{ev}");
    assert!(
        find_event(&evs, "mounted", &[]).is_some(),
        "no mounted event:\n{evs:#?}"
    );
    let out = run(Command::new(BIN).args(["events"]).arg(&m.mnt));
    let txt = text(&out);
    assert!(
        txt.lines()
            .any(|l| l.contains("side_down") && l.contains("side=mirror")),
        "events (text):\n{txt}"
    );

    let out = run_within(Command::new(BIN).arg("fail").arg(&m.mnt).arg("primary"), CMD_LIMIT);
    assert_eq!(out.status.code(), Some(1), "fail of the last side:\n{}", text(&out));
    let (_, st) = status_json(&m.mnt);
    assert_eq!(side_of(&st, "primary")["state"], "UP", "{st:#}");

    fs::write(m.path("after"), b"x").expect("write with the mirror failed by hand");
    m.unmount();
    assert!(m.primary.join("after").exists() && !m.mirror.join("after").exists());

    // The log on each side: the primary's has it all, in order; the mirror's
    // stops where it went down, since nothing touches a side that is down.
    let log = |side: &Path| -> Vec<Value> {
        let p = side.join(".mirrorfs/events.log");
        fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: not JSON ({e}): {l}", p.display())))
            .collect()
    };
    let primary = log(&m.primary);
    let names: Vec<&str> = primary.iter().filter_map(|e| e["event"].as_str()).collect();
    let at = |name: &str| names.iter().position(|n| *n == name);
    assert!(
        at("mounted") < at("side_down") && at("side_down") < at("unmounted") && at("mounted").is_some(),
        "primary events.log: {names:?}"
    );
    let seqs: Vec<u64> = primary.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(
        seqs.len() == primary.len() && seqs.windows(2).all(|w| w[0] < w[1]),
        "seq must rise: {seqs:?}"
    );
    let mirror = log(&m.mirror);
    assert!(
        find_event(&mirror, "side_down", &[]).is_none() && find_event(&mirror, "unmounted", &[]).is_none(),
        "the mirror's events.log was written after it went down: {mirror:#?}"
    );
}

#[test]
fn mirrors_off_writes_the_primary_only() {
    let test = "mirrors_off_writes_the_primary_only";
    let Some(mut m) = Mounted::on_sides(test, None, None, "mirrors=off") else {
        return;
    };
    let (code, txt) = status(&m.mnt);
    assert_eq!(code, 1, "{txt}");
    assert!(
        txt.lines()
            .any(|l| l.trim_start().starts_with("mirror") && l.contains("OFF")),
        "{txt}"
    );
    let (code, st) = status_json(&m.mnt);
    assert_eq!(code, 1, "{st:#}");
    assert_eq!(side_of(&st, "mirror")["state"], "OFF", "{st:#}");
    assert_eq!(side_of(&st, "primary")["state"], "UP", "{st:#}");
    write_synced(&m.path("f"), b"data").unwrap();
    fs::create_dir(m.path("d")).unwrap();
    m.unmount();
    assert_eq!(fs::read(m.primary.join("f")).unwrap(), b"data");
    assert!(m.primary.join("d").is_dir());
    let left: Vec<_> = fs::read_dir(&m.mirror)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "mirrors=off wrote to the mirror: {left:?}");
}

/// Removes a file when dropped (the slow hook runs while it exists).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn script(path: &Path, body: &str) {
    fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn hook_gets_each_event_and_a_slow_hook_blocks_nothing() {
    let test = "hook_gets_each_event_and_a_slow_hook_blocks_nothing";
    if !fuse_available(test) {
        return;
    }
    let t = open_tempdir();
    let (hook, got) = (t.path().join("hook"), t.path().join("hook.out"));
    script(&hook, &format!("cat >> {g}\necho >> {g}", g = got.display()));
    let mut m = Mounted::on_sides(test, None, None, &format!("hook={}", hook.display())).unwrap();
    let out = run_within(Command::new(BIN).arg("fail").arg(&m.mnt).arg("mirror"), CMD_LIMIT);
    assert!(out.status.success(), "fail:\n{}", text(&out));
    let deadline = Instant::now() + Duration::from_secs(10);
    let ev = loop {
        let txt = fs::read_to_string(&got).unwrap_or_default();
        let found = txt
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
            .find(|v| v["event"] == "side_down");
        if let Some(v) = found {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "no side_down from the hook within 10 s:\n{txt}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(ev["side"], "mirror", "{ev}");
    assert_eq!(ev["op"], "fail", "{ev}");
    m.unmount();

    // A hook that takes a minute (it waits while `flag` exists, at most
    // 60 s, so that none outlives the test).
    let flag = t.path().join("hook.flag");
    fs::write(&flag, b"").unwrap();
    let _flag = RemoveOnDrop(flag.clone());
    let slow = t.path().join("slow-hook");
    script(
        &slow,
        &format!(
            "i=0\nwhile [ -e {f} ] && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done",
            f = flag.display()
        ),
    );
    let t0 = Instant::now();
    let mut m = Mounted::on_sides(test, None, None, &format!("hook={}", slow.display())).unwrap();
    eprintln!("slow hook: mounted in {:.2} s", t0.elapsed().as_secs_f64());
    let t0 = Instant::now();
    for i in 0..50u64 {
        write_synced(&m.path(&format!("f{i}")), &noise(4096, i)).unwrap();
    }
    let writes = t0.elapsed();
    let t0 = Instant::now();
    let out = run_within(Command::new(BIN).arg("fail").arg(&m.mnt).arg("mirror"), CMD_LIMIT);
    let fail = t0.elapsed();
    assert!(out.status.success(), "fail:\n{}", text(&out));
    let t0 = Instant::now();
    for i in 50..100u64 {
        write_synced(&m.path(&format!("f{i}")), &noise(4096, i)).unwrap();
    }
    let writes_after = t0.elapsed();
    let t0 = Instant::now();
    let (code, txt) = status(&m.mnt);
    let st = t0.elapsed();
    eprintln!(
        "slow hook: 50 writes {:.2} s, fail {:.2} s, 50 writes after {:.2} s, status {:.2} s",
        writes.as_secs_f64(),
        fail.as_secs_f64(),
        writes_after.as_secs_f64(),
        st.as_secs_f64()
    );
    assert_eq!(code, 2, "{txt}");
    for (what, took) in [
        ("writes", writes),
        ("fail", fail),
        ("writes after fail", writes_after),
        ("status", st),
    ] {
        assert!(took < Duration::from_secs(5), "{what} took {took:?} with a slow hook");
    }
    drop(_flag);
    m.unmount();
    for i in 0..100u64 {
        assert_same(
            &fs::read(m.primary.join(format!("f{i}"))).unwrap(),
            &noise(4096, i),
            "primary",
        );
    }
}

// ---------------------------------------------------------------- PostgreSQL under a side failure

/// initdb and pgbench -i -s 5 on a mount with `failing` on a zram device,
/// then pgbench -c 4 -j 2 -T 20 with that side failing after 5 s: no client
/// may see an error, and the survivor holds a consistent cluster.
fn pgbench_through_failure(test: &str, failing: &str) {
    if !fuse_available(test) {
        return;
    }
    let z = Zram::new("1G", ZramMount::Sync);
    let zside = z.side();
    let (p, mr) = if failing == "primary" {
        (Some(zside.as_path()), None)
    } else {
        (None, Some(zside.as_path()))
    };
    let mut m = Mounted::on_sides(test, p, mr, "allow_other").unwrap();
    chown_postgres_0700(&m.mnt);
    let sock = open_tempdir();
    fs::set_permissions(sock.path(), fs::Permissions::from_mode(0o777)).unwrap();
    ok(as_postgres("initdb")
        .args(["-k", "-A", "trust", "-U", "postgres", "-D"])
        .arg(&m.mnt));
    let mut pg = PgServer::start(&m.mnt, sock.path());
    pg.pgbench(&["-i", "-s", "5"]);
    let mut bench = as_postgres("pgbench");
    bench
        .arg("-h")
        .arg(&pg.sockdir)
        .args(["-p", &pg.port.to_string()])
        .args(["-c", "4", "-j", "2", "-T", "20", "postgres"]);
    let runner = std::thread::spawn(move || run(&mut bench));
    std::thread::sleep(Duration::from_secs(5));
    z.fail();
    let took = wait_down(&m.mnt, failing, Duration::from_secs(30));
    let out = runner.join().expect("pgbench thread");
    let all = text(&out);
    let PgbenchOutcome {
        client_errors,
        failed,
        processed,
    } = PgbenchOutcome::of(&all);
    eprintln!(
        "pgbench with the {failing} failing: status showed it DOWN {:.3} s after the fault; \
         {client_errors} client error lines, failed transactions {failed:?}, processed {processed:?}",
        took.as_secs_f64()
    );
    if !out.status.success() || client_errors > 0 || failed != Some(0) {
        let log = fs::read_to_string(&pg.log).unwrap_or_default();
        panic!(
            "pgbench with the {failing} failing ({}):\n{all}\n--- server log ---\n{log}",
            out.status
        );
    }
    let (code, txt) = status(&m.mnt);
    assert_eq!(code, 2, "{txt}");
    pg.stop();
    m.unmount();
    let survivor = if failing == "primary" { &m.mirror } else { &m.primary };
    assert_checksums(survivor);
}

#[test]
fn pgbench_through_a_mirror_failure() {
    pgbench_through_failure("pgbench_through_a_mirror_failure", "mirror");
}

#[test]
fn pgbench_through_a_primary_failure() {
    pgbench_through_failure("pgbench_through_a_primary_failure", "primary");
}
