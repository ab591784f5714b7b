//! Bringing a side back: a side that comes back after a real fault is caught
//! up with only what it missed, a stale side is never a source, a split
//! brain is held until the winner is named, a resync under writes ends with
//! identical sides, and `verify --repair` fixes a damaged mirror. Every test
//! ends with `mirrorfs verify` online (exit 0) and offline (exit 0).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{BIN, Mounted, fuse_available, noise, run_within};
use crate::failover::{events, side_of, status_json};
use crate::faults::{Zram, ZramMount, assert_same, write_synced};
use crate::workloads::text;

const MIB: usize = 1 << 20;
/// Generous: other tests share the machine's two cores.
const CMD_LIMIT: Duration = Duration::from_secs(60);
const RESYNC_LIMIT: Duration = Duration::from_secs(300);
const STATE_LIMIT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------- helpers

/// `mirrorfs ARGS... TARGET`: exit code and all output.
fn mirrorfs(args: &[&str], target: impl AsRef<std::ffi::OsStr>, limit: Duration) -> (i32, String) {
    let out = run_within(Command::new(BIN).args(args).arg(target), limit);
    (out.status.code().unwrap_or(-1), text(&out))
}

fn has_event(evs: &[Value], name: &str, side: &str) -> bool {
    evs.iter().any(|e| e["event"] == name && e["side"] == side)
}

/// What a failure message needs: the events and, for a daemon started by
/// `try_remount`, its log (the fixture's own daemon logs to the test's stderr).
fn diagnostics(mnt: &Path) -> String {
    let (_, evs) = mirrorfs(&["events"], mnt, CMD_LIMIT);
    let log_path = mirrorfs::runtime::runtime_file(mnt, "log");
    let log = fs::read_to_string(&log_path).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(80).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    format!(
        "--- events ---\n{evs}\n--- daemon log {} (last 80 lines; empty for the fixture's daemon, whose log is on stderr) ---\n{}",
        log_path.display(),
        tail.join("\n")
    )
}

/// Polls `status --json` until `done(exit code, status)`; returns the status.
fn wait_status(mnt: &Path, what: &str, limit: Duration, done: impl Fn(i32, &Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let (code, st) = status_json(mnt);
        if done(code, &st) {
            eprintln!("{what}: after {:.1} s", t0.elapsed().as_secs_f64());
            return st;
        }
        if t0.elapsed() > limit {
            panic!(
                "{what}: not within {limit:?}; status exit {code}:\n{st:#}\n{}",
                diagnostics(mnt)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_healthy(mnt: &Path, limit: Duration) -> Value {
    wait_status(mnt, "HEALTHY", limit, |code, st| code == 0 && st["state"] == "HEALTHY")
}

fn spec(m: &Mounted) -> String {
    format!("{}|{}", m.primary.display(), m.mirror.display())
}

fn assert_verify(target: &str, want: i32, extra: &[&str]) -> String {
    let mut args = vec!["verify"];
    args.extend_from_slice(extra);
    let (code, out) = mirrorfs(&args, target, RESYNC_LIMIT);
    assert_eq!(code, want, "mirrorfs {} '{target}':\n{out}", args.join(" "));
    out
}

fn verify_online(m: &Mounted) {
    assert_verify(m.mnt.to_str().unwrap(), 0, &[]);
}

/// The paths `verify --json` reports.
fn reported(target: &str) -> Vec<String> {
    let out = assert_verify(target, 1, &["--json"]);
    let json = &out[out.find('{').unwrap_or(0)..out.rfind('}').map_or(out.len(), |i| i + 1)];
    let report: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("verify --json ({e}):\n{out}"));
    report["differences"]
        .as_array()
        .unwrap_or_else(|| panic!("no differences array:\n{report:#}"))
        .iter()
        .map(|d| d["path"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// A side's tree without mirrorfs's own `.mirrorfs/`: mode (with the type)
/// and content (a symlink's target) by path.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u32, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, (u32, Vec<u8>)>) {
        for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            if rel == Path::new(".mirrorfs") {
                continue;
            }
            let md = fs::symlink_metadata(&p).unwrap();
            let data = if md.is_file() {
                fs::read(&p).unwrap()
            } else if md.is_symlink() {
                fs::read_link(&p).unwrap().into_os_string().into_encoded_bytes()
            } else {
                Vec::new()
            };
            out.insert(rel, (md.mode(), data));
            if md.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn assert_same_tree(got: &BTreeMap<PathBuf, (u32, Vec<u8>)>, want: &BTreeMap<PathBuf, (u32, Vec<u8>)>, what: &str) {
    let differ: Vec<_> = got
        .keys()
        .chain(want.keys())
        .filter(|k| got.get(*k) != want.get(*k))
        .collect();
    assert!(differ.is_empty(), "{what}: these paths changed: {differ:?}");
}

fn pwrite_synced(path: &Path, data: &[u8], at: u64) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, at)
        .and_then(|_| f.sync_all())
        .unwrap_or_else(|e| panic!("pwrite {}: {e}", path.display()));
}

fn errno_of<T: std::fmt::Debug>(r: std::io::Result<T>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

// ---------------------------------------------------------------- tests

#[test]
fn mirror_comes_back_after_zram_heal_and_only_the_change_is_copied() {
    let test = "mirror_comes_back_after_zram_heal_and_only_the_change_is_copied";
    if !fuse_available(test) {
        return;
    }
    let z = Zram::new("512M", ZramMount::Sync);
    let mut m = Mounted::on_sides(test, None, Some(&z.side()), "probe_interval=1").unwrap();
    for i in 0..40u64 {
        write_synced(&m.path(&format!("f{i:02}")), &noise(MIB, i)).unwrap();
    }
    write_synced(&m.path("big"), &noise(32 * MIB, 100)).unwrap();
    let tree = 72 * MIB as u64;

    z.fail();
    // The fault is met by an overwrite in place (in the chunk changed again
    // below), not a create: a create that fails on this journal-less ext4
    // leaves a name in the directory that lookup says is absent and create
    // says exists, a corruption only fsck repairs.
    let t0 = Instant::now();
    for i in 0.. {
        let (_, st) = status_json(&m.mnt);
        if side_of(&st, "mirror")["state"] == "DOWN" {
            break;
        }
        assert!(
            t0.elapsed() < STATE_LIMIT,
            "mirror not DOWN after the zram failed:\n{st:#}"
        );
        pwrite_synced(&m.path("big"), &noise(4096, 200 + i), 16 * MIB as u64);
    }
    write_synced(&m.path("f00"), &noise(MIB, 300)).unwrap();
    let mut f = OpenOptions::new().append(true).open(m.path("f01")).unwrap();
    f.write_all(&noise(256 << 10, 301)).and_then(|_| f.sync_all()).unwrap();
    drop(f);
    pwrite_synced(&m.path("big"), &noise(4096, 302), 16 * MIB as u64 + 12_345);
    write_synced(&m.path("new1"), &noise(32 << 10, 303)).unwrap();
    write_synced(&m.path("new2"), &noise(32 << 10, 304)).unwrap();
    fs::remove_file(m.path("f02")).unwrap();
    fs::rename(m.path("f03"), m.path("f03.moved")).unwrap();
    let changed = MIB + (256 << 10) + 2 * 4096 + (64 << 10);
    let (code, st) = status_json(&m.mnt);
    assert_eq!(
        (code, side_of(&st, "mirror")["state"].as_str()),
        (2, Some("DOWN")),
        "{st:#}"
    );

    z.heal();
    let st = wait_status(&m.mnt, "mirror back after heal", STATE_LIMIT, |code, st| {
        code == 0 && st["last_resync"]["ok"] == true
    });
    let last = &st["last_resync"];
    eprintln!("{test}: changed about {changed} bytes; last_resync: {last}");
    assert_eq!(last["side"], "mirror", "{st:#}");
    let copied = last["bytes_copied"].as_u64().unwrap_or_else(|| panic!("{st:#}"));
    // The changes plus at most a 1 MiB chunk per changed file region.
    assert!(
        copied >= MIB as u64 && copied <= 4 * MIB as u64 && copied < tree / 10,
        "bytes_copied {copied}: about {changed} changed in a {tree}-byte tree:\n{st:#}"
    );
    let evs = events(&m.mnt);
    for name in ["resync_started", "resync_done", "side_up"] {
        assert!(has_event(&evs, name, "mirror"), "no {name} for the mirror:\n{evs:#?}");
    }
    assert_same(&fs::read(m.mirror.join("f00")).unwrap(), &noise(MIB, 300), "mirror f00");
    assert!(!m.mirror.join("f02").exists() && !m.mirror.join("f03").exists());
    verify_online(&m);
    m.unmount();
    assert_verify(&spec(&m), 0, &[]);
    m.assert_identical();
}

fn fail_mirror(mnt: &Path) {
    let out = run_within(Command::new(BIN).arg("fail").arg(mnt).arg("mirror"), CMD_LIMIT);
    assert!(
        out.status.success(),
        "mirrorfs fail {} mirror:\n{}",
        mnt.display(),
        text(&out)
    );
}

/// `mirrorfs resync --wait [EXTRA...] MNT`, which must succeed.
fn resync(mnt: &Path, extra: &[&str]) -> String {
    let mut args = vec!["resync", "--wait"];
    args.extend_from_slice(extra);
    let t0 = Instant::now();
    let (code, out) = mirrorfs(&args, mnt, RESYNC_LIMIT);
    let took = t0.elapsed().as_secs_f64();
    assert_eq!(
        code,
        0,
        "mirrorfs {} exited {code} after {took:.1} s:\n{out}\n{}",
        args.join(" "),
        diagnostics(mnt)
    );
    eprintln!("mirrorfs {}: {took:.1} s: {}", args.join(" "), out.trim());
    out
}

#[test]
fn a_stale_mirror_is_caught_up_and_never_a_source() {
    let test = "a_stale_mirror_is_caught_up_and_never_a_source";
    let Some(mut m) = Mounted::new(test, "") else {
        return;
    };
    let (a1, a2, b, c) = (noise(200_000, 1), noise(150_000, 2), noise(70_000, 3), noise(50_000, 4));
    write_synced(&m.path("a"), &a1).unwrap();
    write_synced(&m.path("c"), &c).unwrap();
    fail_mirror(&m.mnt);
    write_synced(&m.path("a"), &a2).unwrap();
    write_synced(&m.path("b"), &b).unwrap();
    m.unmount();
    // Damage the stale mirror behind mirrorfs's back: if it were ever read
    // as a source, these bytes would show up.
    fs::write(m.mirror.join("a"), noise(180_000, 9)).unwrap();
    fs::write(m.mirror.join("junk"), b"junk").unwrap();
    let primary = snapshot(&m.primary);

    m.try_remount("noautoresync")
        .unwrap_or_else(|e| panic!("read-write mount with a stale mirror: {e}"));
    let (code, st) = status_json(&m.mnt);
    assert_eq!((code, st["state"].as_str()), (2, Some("DEGRADED")), "{st:#}");
    let mirror = side_of(&st, "mirror");
    assert_eq!(mirror["state"], "DOWN", "{st:#}");
    assert!(
        mirror["reason"].as_str().is_some_and(|r| r.contains("stale")),
        "the reason should say stale:\n{st:#}"
    );
    assert_same(&fs::read(m.path("a")).unwrap(), &a2, "a through the mount");
    assert!(!m.path("junk").exists(), "junk (on the stale mirror alone) is visible");

    resync(&m.mnt, &[]);
    assert_same(&fs::read(m.mirror.join("a")).unwrap(), &a2, "mirror a after resync");
    assert_same(&fs::read(m.mirror.join("b")).unwrap(), &b, "mirror b after resync");
    // junk was never journaled: only a full comparison finds it.
    resync(&m.mnt, &["--full"]);
    assert!(!m.mirror.join("junk").exists(), "resync --full left the mirror's junk");
    assert_same_tree(&snapshot(&m.primary), &primary, "the primary (the good side)");
    wait_healthy(&m.mnt, STATE_LIMIT);
    verify_online(&m);
    m.unmount();
    assert_verify(&spec(&m), 0, &[]);
    m.assert_identical();
}

/// Makes a split brain on a mounted pair: `x` on both sides, then each
/// side mounted alone takes changes the other lacks (`p_only` and `x` on
/// the primary, `m_only` and a longer `x` on the mirror); the pair is then
/// mounted with `opts`. Returns the mirror's `x`.
pub(crate) fn split_brain(m: &mut Mounted, opts: &str) -> Vec<u8> {
    write_synced(&m.path("x"), b"x, written with both sides").unwrap();
    m.unmount();
    let away = |p: &Path| p.with_extension("away");

    fs::rename(&m.mirror, away(&m.mirror)).unwrap();
    m.try_remount("mirror_skip")
        .unwrap_or_else(|e| panic!("primary alone: {e}"));
    write_synced(&m.path("p_only"), b"primary alone").unwrap();
    write_synced(&m.path("x"), b"x from the primary alone").unwrap();
    m.unmount();

    fs::rename(&m.primary, away(&m.primary)).unwrap();
    fs::rename(away(&m.mirror), &m.mirror).unwrap();
    m.try_remount("mirror_skip")
        .unwrap_or_else(|e| panic!("mirror alone: {e}"));
    write_synced(&m.path("m_only"), b"mirror alone").unwrap();
    let mirror_x = b"x from the mirror alone, a longer version".to_vec();
    write_synced(&m.path("x"), &mirror_x).unwrap();
    m.unmount();
    fs::rename(away(&m.primary), &m.primary).unwrap();
    m.try_remount(opts)
        .unwrap_or_else(|e| panic!("both sides after a split: {e}"));
    mirror_x
}

#[test]
fn split_brain_is_detected_and_resolved_by_resync_from() {
    let test = "split_brain_is_detected_and_resolved_by_resync_from";
    let Some(mut m) = Mounted::new(test, "") else {
        return;
    };
    let mirror_x = split_brain(&mut m, "");
    let before = (snapshot(&m.primary), snapshot(&m.mirror));
    let (code, st) = status_json(&m.mnt);
    assert_eq!(
        (code, st["state"].as_str()),
        (2, Some("SPLIT")),
        "{st:#}\n{}",
        diagnostics(&m.mnt)
    );
    let evs = events(&m.mnt);
    assert!(
        evs.iter().any(|e| e["event"] == "split_brain"),
        "no split_brain event:\n{evs:#?}"
    );
    assert_eq!(
        errno_of(fs::read(m.path("x"))),
        Some(libc::EIO),
        "read of x while split"
    );
    assert_eq!(
        errno_of(File::create(m.path("new"))),
        Some(libc::EIO),
        "create while split: nothing is served"
    );
    let (code, out) = mirrorfs(&["resync", "--wait"], &m.mnt, RESYNC_LIMIT);
    assert_eq!(code, 1, "resync without --from while split:\n{out}");
    assert_same_tree(&snapshot(&m.primary), &before.0, "the primary while split");
    assert_same_tree(&snapshot(&m.mirror), &before.1, "the mirror while split");

    resync(&m.mnt, &["--from", "mirror"]);
    wait_healthy(&m.mnt, STATE_LIMIT);
    assert_eq!(fs::read(m.primary.join("m_only")).unwrap(), b"mirror alone");
    assert_eq!(fs::read(m.primary.join("x")).unwrap(), mirror_x);
    assert!(!m.primary.join("p_only").exists(), "the losing side's p_only is left");
    assert_eq!(fs::read(m.path("x")).unwrap(), mirror_x, "x through the mount");
    assert_same_tree(&snapshot(&m.mirror), &before.1, "the mirror (the winner)");
    verify_online(&m);
    m.unmount();
    assert_verify(&spec(&m), 0, &[]);
    m.assert_identical();
}

const BIG: usize = 12 * MIB;
const RECORD: usize = 4096;

fn record(i: u64) -> Vec<u8> {
    noise(RECORD, 70_000 + i)
}

/// Appends record `n` to `held` at its place and fsyncs it.
fn put_record(held: &File, n: &AtomicU64) -> std::io::Result<()> {
    let i = n.load(Ordering::Relaxed);
    held.write_all_at(&record(i), i * RECORD as u64)?;
    held.sync_data()?;
    n.store(i + 1, Ordering::Relaxed);
    Ok(())
}

/// Writes through the mount until stopped: random fsync'd pwrites into the
/// big files, a record to `held`, and small files created, renamed and
/// deleted. Returns the errors it saw (it stops at the first).
fn writer(
    mnt: PathBuf,
    held: Arc<File>,
    records: Arc<AtomicU64>,
    ops: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Vec<String> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut i = 0u64;
    let mut doomed = 50u64;
    while !stop.load(Ordering::Relaxed) {
        let r = (|| -> std::io::Result<()> {
            let big = mnt.join(format!("big{}", rand(4)));
            let f = OpenOptions::new().write(true).open(&big)?;
            f.write_all_at(&noise(64 << 10, 90_000 + i), rand((BIG - (64 << 10)) as u64))?;
            f.sync_data()?;
            put_record(&held, &records)?;
            write_synced(&mnt.join(format!("w/c{i}")), &noise(8192, 95_000 + i))?;
            if i % 3 == 1 {
                fs::rename(mnt.join(format!("w/c{}", i - 1)), mnt.join(format!("w/r{}", i - 1)))?;
            }
            if i.is_multiple_of(5) && doomed < 500 {
                fs::remove_file(mnt.join(format!("small/s{doomed:03}")))?;
                doomed += 1;
            }
            Ok(())
        })();
        if let Err(e) = r {
            return vec![format!("writer step {i}: {e}")];
        }
        i += 1;
        ops.store(i, Ordering::Relaxed);
    }
    Vec::new()
}

#[test]
fn resync_under_writes_ends_with_identical_sides() {
    let test = "resync_under_writes_ends_with_identical_sides";
    let Some(mut m) = Mounted::new(test, "probe_interval=1") else {
        return;
    };
    for b in 0..4u64 {
        write_synced(&m.path(&format!("big{b}")), &noise(BIG, 10 + b)).unwrap();
    }
    fs::create_dir(m.path("small")).unwrap();
    fs::create_dir(m.path("w")).unwrap();
    for s in 0..500u64 {
        fs::write(m.path(&format!("small/s{s:03}")), noise(32 << 10, 1000 + s)).unwrap();
    }
    // Opened before the fail and written all through: the resync must
    // re-attach it to the mirror.
    let held = Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(m.path("held"))
            .unwrap(),
    );
    let records = Arc::new(AtomicU64::new(0));
    for _ in 0..16 {
        put_record(&held, &records).unwrap();
    }

    fail_mirror(&m.mnt);
    for r in 0..8u64 {
        pwrite_synced(
            &m.path(&format!("big{}", r % 4)),
            &noise(512 << 10, 2000 + r),
            (r / 4) * 5 * MIB as u64 + 3 * MIB as u64 + r * 777,
        );
    }
    for s in 0..50u64 {
        fs::remove_file(m.path(&format!("small/s{s:03}"))).unwrap();
        fs::write(m.path(&format!("small/n{s:03}")), noise(16 << 10, 3000 + s)).unwrap();
    }
    for _ in 0..16 {
        put_record(&held, &records).unwrap();
    }
    let (code, st) = status_json(&m.mnt);
    assert_eq!(
        (code, side_of(&st, "mirror")["state"].as_str()),
        (2, Some("DOWN")),
        "{st:#}"
    );

    let (ops, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
    let w = {
        let (mnt, held, records, ops, stop) = (m.mnt.clone(), held.clone(), records.clone(), ops.clone(), stop.clone());
        std::thread::spawn(move || writer(mnt, held, records, ops, stop))
    };
    let t0 = Instant::now();
    while ops.load(Ordering::Relaxed) < 10 {
        assert!(
            t0.elapsed() < STATE_LIMIT && !w.is_finished(),
            "the writer makes no progress"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let at_start = ops.load(Ordering::Relaxed);
    resync(&m.mnt, &[]);
    let at_end = ops.load(Ordering::Relaxed);
    assert!(
        at_end > at_start,
        "no writes while the resync ran: {at_start} -> {at_end}"
    );
    // Load after the resync, with the mirror back in service.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let errors = w.join().expect("writer thread");
    let total = ops.load(Ordering::Relaxed);
    eprintln!("{test}: writer steps: {at_start} before the resync, {at_end} at its end, {total} in all");
    assert!(
        errors.is_empty(),
        "the writer saw errors:\n{errors:#?}\n{}",
        diagnostics(&m.mnt)
    );
    assert!(total > at_end, "no writes after the resync: {at_end} -> {total}");

    wait_healthy(&m.mnt, STATE_LIMIT);
    for _ in 0..16 {
        put_record(&held, &records).unwrap();
    }
    held.sync_all().unwrap();
    verify_online(&m);
    drop(held);
    m.unmount();
    assert_verify(&spec(&m), 0, &[]);
    m.assert_identical();
    let n = records.load(Ordering::Relaxed);
    for side in [&m.primary, &m.mirror] {
        let got = fs::read(side.join("held")).unwrap();
        let want: Vec<u8> = (0..n).flat_map(record).collect();
        assert_same(&got, &want, &format!("{}/held", side.display()));
    }
}

#[test]
fn verify_repair_fixes_the_mirror_online_and_offline() {
    let test = "verify_repair_fixes_the_mirror_online_and_offline";
    let Some(mut m) = Mounted::new(test, "") else {
        return;
    };
    fs::create_dir(m.path("d")).unwrap();
    for (i, name) in ["a", "b", "c", "d/e", "f"].iter().enumerate() {
        write_synced(&m.path(name), &noise(300_000, i as u64)).unwrap();
    }
    let primary = snapshot(&m.primary);
    let mnt = m.mnt.to_str().unwrap().to_string();

    pwrite_synced(&m.mirror.join("a"), b"damage", 150_000);
    fs::set_permissions(m.mirror.join("b"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::remove_file(m.mirror.join("c")).unwrap();
    fs::write(m.mirror.join("stray"), b"stray").unwrap();
    let mut paths = reported(&mnt);
    paths.sort();
    assert_eq!(paths, ["/a", "/b", "/c", "/stray"], "online verify of a damaged mirror");
    assert_verify(&mnt, 0, &["--repair"]);
    verify_online(&m);
    assert_same_tree(&snapshot(&m.mirror), &primary, "the mirror after an online repair");
    assert_same_tree(&snapshot(&m.primary), &primary, "the primary after an online repair");
    m.unmount();

    let pair = spec(&m);
    fs::write(m.mirror.join("a"), b"short").unwrap();
    pwrite_synced(&m.mirror.join("d/e"), b"damage", 1);
    fs::set_permissions(m.mirror.join("f"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::remove_file(m.mirror.join("b")).unwrap();
    fs::create_dir(m.mirror.join("strays")).unwrap();
    fs::write(m.mirror.join("strays/s"), b"stray").unwrap();
    let paths = reported(&pair);
    for p in ["/a", "/b", "/d/e", "/f", "/strays"] {
        assert!(
            paths.iter().any(|q| q == p),
            "offline verify did not name {p}: {paths:?}"
        );
    }
    assert_verify(&pair, 0, &["--repair"]);
    assert_verify(&pair, 0, &[]);
    assert_same_tree(&snapshot(&m.primary), &primary, "the primary after an offline repair");
    m.assert_identical();
}
