//! Asynchronous mode (`-o async`): the primary answers, the mirror follows
//! from the change log. Each test ends with the sides identical once the
//! log is drained, except where the primary is lost on purpose.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{BIN, Mounted, noise, ok, open_tempdir, run};
use crate::failover::{side_of, status_json};
use crate::faults::{Sshfs, write_synced};
use crate::workloads::{PgServer, as_postgres, assert_checksums, assert_pgbench_invariant, chown_postgres_0700};

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

/// Waits until a resync has brought the mount back to HEALTHY.
fn wait_resynced(mnt: &Path, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let (code, st) = status_json(mnt);
        if code == 0 && st["state"] == "HEALTHY" && st["last_resync"]["ok"] == true {
            return st;
        }
        assert!(Instant::now() < deadline, "no resync to HEALTHY in {limit:?}: {st:#}");
        std::thread::sleep(Duration::from_millis(100));
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
    // Brought back from the log: the journal of missed changes is empty,
    // so the catch-up pass examines no file and copies nothing.
    assert_eq!(st["last_resync"]["files"], 0, "{st:#}");
    assert_eq!(st["resync_bytes_copied"], 0, "{st:#}");
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
    if !crate::common::fuse_available(test) {
        return;
    }
    let s = Sshfs::new();
    let opts = "async,max_log=256K,max_lag=0.5,side_timeout=1,probe_interval=0.5";
    let Some(m) = Mounted::on_sides(test, None, Some(&s.side()), opts) else {
        return;
    };
    let _resume = s.resume_on_drop();
    write_synced(&m.path("before"), b"before").unwrap();
    wait_drained(&m.mnt, Duration::from_secs(20));
    s.hang();
    // Writers are held past max_lag until the stuck shipper has spent
    // side_timeout on one call; then the mirror is DOWN and the log grows.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut i = 0u64;
    let mut after_down = 0;
    while after_down < 4 {
        write_synced(&m.path(&format!("while-down{i}")), &noise(128 << 10, i)).unwrap();
        i += 1;
        if side_of(&status_json(&m.mnt).1, "mirror")["state"] == "DOWN" {
            after_down += 1;
        }
        assert!(
            Instant::now() < deadline,
            "the hung mirror is not DOWN after 15 s of writes"
        );
    }
    let (_, st) = status_json(&m.mnt);
    assert!(
        !m.primary.join(".mirrorfs/changelog").exists(),
        "the log outgrew max_log and was kept"
    );
    assert!(st["pending_paths"].as_u64().unwrap_or(0) > 0, "{st:#}");
    // Back: the missed-change journal brings it up to date with a resync.
    s.resume();
    let st = wait_resynced(&m.mnt, Duration::from_secs(60));
    assert!(events(&st).contains(&"resync_started".to_string()), "{st:#}");
    assert!(
        st["resync_bytes_copied"].as_u64().unwrap_or(0) >= 4 * (128 << 10),
        "{st:#}"
    );
    for j in 0..i {
        assert_eq!(
            fs::read(s.side().join(format!("while-down{j}"))).unwrap(),
            noise(128 << 10, j)
        );
    }
    m.assert_identical();
    m.finish();
}

/// A mirror slower than the work: over a link with 20 ms each way, a
/// writer of fsync'd files outruns the shipper. The writer is held, and the
/// lag (sampled every 20 ms until the mirror has everything) stays within
/// max_lag and what the shipper applies in a second (its checkpoint
/// period: a batch).
#[test]
fn with_a_slow_mirror_writers_are_held_and_the_lag_stays_bounded() {
    let test = "with_a_slow_mirror_writers_are_held_and_the_lag_stays_bounded";
    if !crate::common::fuse_available(test) {
        return;
    }
    const MAX_LAG: f64 = 1.0;
    let s = Sshfs::with_delay(Some(Duration::from_millis(20)));
    let Some(m) = Mounted::on_sides(test, None, Some(&s.side()), "async,max_lag=1") else {
        return;
    };
    wait_drained(&m.mnt, Duration::from_secs(30));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, dir) = (stop.clone(), m.mnt.clone());
        std::thread::spawn(move || {
            let (mut n, mut slowest) = (0u64, Duration::ZERO);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                write_synced(&dir.join(format!("w{}", n % 64)), &noise(8 << 10, n)).unwrap();
                slowest = slowest.max(t.elapsed());
                n += 1;
            }
            (n, slowest)
        })
    };
    let started = Instant::now();
    let mut highest = 0f64;
    while started.elapsed() < Duration::from_secs(8) {
        let (_, st) = status_json(&m.mnt);
        highest = highest.max(st["lag_seconds"].as_f64().unwrap_or(0.0));
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (writes, slowest) = writer.join().unwrap();
    // And until the mirror has it all: the lag is highest at the end of
    // the backlog.
    let deadline = Instant::now() + Duration::from_secs(60);
    let st = loop {
        let (_, st) = status_json(&m.mnt);
        highest = highest.max(st["lag_seconds"].as_f64().unwrap_or(0.0));
        if st["lag_ops"] == 0 {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "not drained 60 s after the writer stopped: {st:#}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("{test}: {writes} writes in 8 s, slowest {slowest:?}; highest lag {highest:.3} s; {st}");
    assert!(
        events(&st).contains(&"lag_exceeded".to_string()),
        "the writer never outran the mirror: {st:#}"
    );
    assert!(
        highest <= MAX_LAG + 1.0,
        "the lag reached {highest:.3} s with max_lag={MAX_LAG}"
    );
    assert_eq!(side_of(&st, "mirror")["state"], "UP", "{st:#}");
    // Raised once the drained mirror's checkpoint is durable, a round
    // trip or two after the lag reads 0.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, st) = status_json(&m.mnt);
        if events(&st).contains(&"lag_recovered".to_string()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no lag_recovered 10 s after the drain: {st:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    m.assert_identical();
    m.finish();
}

/// Records re-sent after a kill: the daemon is killed while the shipper is
/// held inside a call on the mirror (sshfs stopped), so that what it had
/// applied is known exactly (the log's end less `lag_ops`). The next mount
/// applies `shipped_ops` records to drain the log; those beyond the lag at
/// the kill were on the mirror already.
#[test]
fn killed_while_shipping_it_resends_at_most_one_batch() {
    let test = "killed_while_shipping_it_resends_at_most_one_batch";
    if !crate::common::fuse_available(test) {
        return;
    }
    const BATCH: u64 = 256;
    let s = Sshfs::with_delay(Some(Duration::from_millis(5)));
    let opts = "async,max_lag=600,side_timeout=600";
    let Some(mut m) = Mounted::on_sides(test, None, Some(&s.side()), opts) else {
        return;
    };
    let _resume = s.resume_on_drop();
    wait_drained(&m.mnt, Duration::from_secs(30));
    for i in 0..300u64 {
        fs::write(m.path(&format!("f{i}")), noise(1024, i)).unwrap();
        if i % 40 == 39 {
            // A barrier now and then: the shipper checkpoints at most once
            // a second, so the position is not only ever the drain's.
            OpenOptions::new()
                .write(true)
                .open(m.path(&format!("f{i}")))
                .unwrap()
                .sync_all()
                .unwrap();
        }
    }
    // Held while it has shipped more than a batch, with more to go.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, st) = status_json(&m.mnt);
        if st["shipped_ops"].as_u64().unwrap_or(0) > BATCH {
            assert!(
                st["lag_ops"].as_u64().unwrap_or(0) > 0,
                "drained before the hang: {st:#}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the shipper did not ship a batch in 120 s: {st:#}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    s.hang();
    std::thread::sleep(Duration::from_millis(500));
    let (_, before) = status_json(&m.mnt);
    std::thread::sleep(Duration::from_millis(300));
    let (_, still) = status_json(&m.mnt);
    assert_eq!(
        before["lag_ops"], still["lag_ops"],
        "the shipper moved with sshfs stopped"
    );
    let lag = before["lag_ops"].as_u64().unwrap();
    let shipped = before["shipped_ops"].as_u64().unwrap();
    assert!(lag > 0, "{before:#}");
    // The shipper's thread waits in the kernel for sshfs: SIGKILL first,
    // then let sshfs answer so that the daemon can end.
    let pid = nix::unistd::Pid::from_raw(m.daemon_pid().expect("daemon") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    s.resume();
    m.kill9();
    m.respawn(opts);
    let after = wait_drained(&m.mnt, Duration::from_secs(120));
    let again = after["shipped_ops"].as_u64().unwrap();
    let resent = again
        .checked_sub(lag)
        .unwrap_or_else(|| panic!("{again} records shipped after the restart, fewer than the {lag} the mirror lacked"));
    eprintln!(
        "{test}: shipped {shipped} before the kill, {lag} left; after the restart {again} shipped: {resent} re-sent"
    );
    assert!(
        resent <= BATCH,
        "re-sent {resent} records after the kill (a batch is {BATCH}; {shipped} had been shipped)"
    );
    m.assert_identical();
    m.finish();
}

/// A small xorshift: the moments of the kills, from a seed printed first.
struct Moments(u64);

impl Moments {
    fn next_ms(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        lo + self.0 % (hi - lo)
    }
}

/// pgbench -c 4 through the mount, in the background, output discarded
/// (its clients fail when the mount dies under them).
fn pgbench_load(pg: &PgServer) -> std::process::Child {
    as_postgres("pgbench")
        .arg("-h")
        .arg(&pg.sockdir)
        .args(["-p", &pg.port.to_string()])
        // -n: no VACUUM and, above all, no TRUNCATE of pgbench_history
        // at the start, so that the invariant holds across the rounds.
        .args(["-n", "-c", "4", "-j", "2", "-T", "600", "postgres"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pgbench")
}

/// PostgreSQL started on a copy of `side` (as it is now) recovers; the
/// pgbench invariant holds and every page's checksum is right. Returns the
/// history's rows.
fn check_cluster_copy(side: &Path, scratch: &Path, what: &str) -> u64 {
    let copy = scratch.join("cluster");
    if copy.exists() {
        fs::remove_dir_all(&copy).unwrap();
    }
    fs::create_dir(&copy).unwrap();
    ok(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", side.display()))
        .arg(&copy));
    chown_postgres_0700(&copy);
    // The killed postmaster's pid may linger as an unreaped zombie here;
    // after a real crash no process has it, and PostgreSQL goes on.
    let _ = fs::remove_file(copy.join("postmaster.pid"));
    let sock = open_tempdir();
    fs::set_permissions(sock.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let mut pg = PgServer::start(&copy, sock.path());
    let rows = assert_pgbench_invariant(&pg, what);
    pg.stop();
    assert_checksums(&copy);
    rows
}

/// Ten crashes at random moments under pgbench, in async mode with the
/// mirror (sshfs over a 10 ms link) behind. Each time the primary is
/// treated as lost: PostgreSQL started on the mirror's directory alone
/// recovers, pgbench's invariant holds, every checksum is right, and the
/// mirror has no more history than the primary. Nine rounds kill -9 the
/// daemon (and the server); the tenth fails the primary through the mount,
/// which then stops serving.
#[test]
fn ten_crashes_under_pgbench_each_leave_a_mirror_postgres_recovers_from() {
    let test = "ten_crashes_under_pgbench_each_leave_a_mirror_postgres_recovers_from";
    if !crate::common::fuse_available(test) {
        return;
    }
    let s = Sshfs::with_delay(Some(Duration::from_millis(10)));
    crash_rounds(test, &s, "async,allow_other,max_lag=2", 10);
}

/// Returns once sshfs has delivered every request it had taken: a file
/// made and synced through it is answered after them (one connection, a
/// server that takes requests in order). After a crash, the requests the
/// link had accepted still land; a copy taken meanwhile would mix states.
fn settled(s: &Sshfs) {
    write_synced(&s.side().join(".mirrorfs").join("test-settled"), b"settled").unwrap();
}

/// `rounds` crashes under pgbench on an async mount (`opts`) of a new
/// primary and `mirror` (whose directory is `backing` where the mirror's
/// host has it); the last round fails the primary instead of killing.
fn crash_rounds(test: &str, s: &Sshfs, opts: &str, rounds: u32) {
    let (mirror, backing) = (&s.side(), &s.remote_side());
    let work = open_tempdir();
    let primary = work.path().join("primary");
    fs::create_dir(&primary).unwrap();
    chown_postgres_0700(&primary);
    // The cluster is made before the mount and copied to the mirror, so
    // that the pair starts identical without shipping initdb's files.
    ok(as_postgres("initdb")
        .args(["-k", "-A", "trust", "-U", "postgres", "-D"])
        .arg(&primary));
    let sock = open_tempdir();
    fs::set_permissions(sock.path(), fs::Permissions::from_mode(0o777)).unwrap();
    {
        let mut pg = PgServer::start(&primary, sock.path());
        pg.pgbench(&["-i", "-s", "2"]);
        pg.stop();
    }
    ok(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", primary.display()))
        .arg(backing));
    chown_postgres_0700(backing);
    let Some(mut m) = Mounted::on_sides(test, Some(&primary), Some(mirror), opts) else {
        return;
    };
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("{test}: seed {seed}");
    let mut moments = Moments(seed);
    let mut pg = PgServer::start(&m.mnt, sock.path());
    for round in 1..=rounds {
        let mut load = pgbench_load(&pg);
        std::thread::sleep(Duration::from_millis(moments.next_ms(500, 4000)));
        // Lag present: the mirror lacks changes at the crash.
        let deadline = Instant::now() + Duration::from_secs(30);
        let lag = loop {
            let (_, st) = status_json(&m.mnt);
            assert_eq!(st["mode"], "async", "round {round}: {st:#}");
            if st["lag_ops"].as_u64().unwrap_or(0) > 0 {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: no lag in 30 s of pgbench: {st:#}"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let last = round == rounds;
        if last {
            // The mirror is held, so that it still lacks changes when the
            // primary fails (the shipper can drain a backlog faster than
            // a command starts). Failing the primary records it as stale
            // on the mirror, which waits for sshfs.
            let resume = s.resume_on_drop();
            s.hang();
            std::thread::sleep(Duration::from_millis(300));
            let fail = Command::new(BIN)
                .arg("fail")
                .arg(&m.mnt)
                .arg("primary")
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(500));
            drop(resume);
            let out = fail.wait_with_output().unwrap();
            assert!(out.status.success(), "mirrorfs fail primary: {out:?}");
            let (code, st) = status_json(&m.mnt);
            assert_eq!(code, 2, "{st:#}");
            assert!(st["lost_ops"].as_u64().unwrap_or(0) > 0, "{st:#}");
        } else {
            m.kill9();
        }
        pg.kill9();
        let _ = load.kill();
        let _ = load.wait();
        let lost = |st: &Value| st["lag_ops"].as_u64().unwrap_or(0);
        settled(s);
        let mirror_rows = check_cluster_copy(backing, work.path(), &format!("round {round}, the mirror"));
        if last {
            m.unmount();
            let _ = fs::remove_file(primary.join("postmaster.pid"));
            pg = PgServer::start(&primary, sock.path());
        } else {
            m.respawn(opts);
            // As on the copy: the killed server's pid file, through the mount.
            let _ = fs::remove_file(m.path("postmaster.pid"));
            pg = PgServer::start(&m.mnt, sock.path());
        }
        let primary_rows = assert_pgbench_invariant(&pg, &format!("round {round}, the primary"));
        eprintln!(
            "{test}: round {round}: {} changes ({:.3} s) behind at the crash; history rows: mirror {mirror_rows}, primary {primary_rows}",
            lost(&lag),
            lag["lag_seconds"].as_f64().unwrap_or(0.0)
        );
        assert!(
            mirror_rows <= primary_rows,
            "round {round}: the mirror has {mirror_rows} history rows, the primary {primary_rows}"
        );
    }
    pg.stop();
}

/// The primary's disk refuses a record after the change it describes was
/// made (a small tmpfs: the data fits, its copy in the log does not). The
/// change stands, the log gives way to the journal of missed changes, the
/// mirror goes down and is resynced from the primary, and the sides end
/// identical.
#[test]
fn a_record_the_primary_cannot_take_hands_the_mirror_to_a_resync() {
    let test = "a_record_the_primary_cannot_take_hands_the_mirror_to_a_resync";
    if !crate::common::fuse_available(test) {
        return;
    }
    let t = crate::faults::SmallTmpfs::new("8m");
    let Some(m) = Mounted::on_sides(test, Some(&t.side()), None, "async,probe_interval=0.5") else {
        return;
    };
    write_synced(&m.path("a"), &noise(1 << 20, 1)).unwrap();
    wait_drained(&m.mnt, Duration::from_secs(30));
    // The primary is filled (outside the tree) to 288 KiB of room: b's
    // 256 KiB of data fit, in one request, and its record does not. (The
    // page cache may send a larger file in pieces, data and record by
    // turns, and then the data can be what meets the end of the disk.)
    const B: usize = 256 << 10;
    let st = nix::sys::statvfs::statvfs(&t.side()).unwrap();
    let room = st.blocks_available() as u64 * st.fragment_size() as u64;
    let filler = fs::File::create(t.side().join(".mirrorfs/filler")).unwrap();
    nix::fcntl::fallocate(
        &filler,
        nix::fcntl::FallocateFlags::empty(),
        0,
        (room - (B as u64 + (32 << 10))) as i64,
    )
    .unwrap();
    write_synced(&m.path("b"), &noise(B, 2)).unwrap();
    assert!(
        !t.side().join(".mirrorfs/changelog").exists(),
        "the log that could not take a record was kept"
    );
    drop(filler);
    fs::remove_file(t.side().join(".mirrorfs/filler")).unwrap();
    let st = wait_resynced(&m.mnt, Duration::from_secs(60));
    let down = st["last_events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["event"] == "side_down" && e["op"] == "changelog" && e["errno"] == "ENOSPC");
    assert!(down, "no side_down of the mirror for the change log: {st:#}");
    assert_eq!(fs::read(m.mirror.join("b")).unwrap(), noise(B, 2));
    m.assert_identical();
    m.finish();
}
