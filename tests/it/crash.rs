//! Crash test (after sled's): kill -9 the daemon at a random moment while
//! writers run, remount, and check that every write acknowledged by fsync
//! survived and that the next mount catches the mirror up (crash_recovery)
//! so that both sides agree.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{BIN, Mounted, noise, run_within};
use crate::failover::events;
use crate::workloads::text;

const ROUNDS: u64 = 20;
const SEED: u64 = 0x6d69_7272_6f72_6673;
const OPTS: &str = "probe_interval=1";
/// A log record: magic, round, sequence, noise, xxh3 of all that.
const RECORD: usize = 4096;
const MAGIC: &[u8; 8] = b"MFSCRASH";

fn record(round: u64, seq: u64) -> Vec<u8> {
    let mut r = MAGIC.to_vec();
    r.extend_from_slice(&round.to_le_bytes());
    r.extend_from_slice(&seq.to_le_bytes());
    r.extend_from_slice(&noise(RECORD - 32, (round << 32) | seq));
    let sum = xxhash_rust::xxh3::xxh3_64(&r);
    r.extend_from_slice(&sum.to_le_bytes());
    r
}

/// (round, seq) of an intact record; None if torn, missing or garbage.
fn parse(r: Option<&[u8]>) -> Option<(u64, u64)> {
    let (body, sum) = r?.split_at(RECORD - 8);
    let word = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().unwrap());
    (body.starts_with(MAGIC) && xxhash_rust::xxh3::xxh3_64(body).to_le_bytes() == sum).then(|| (word(8), word(16)))
}

/// Checks that `log` starts with the records `want` lists as (round, count)
/// runs; returns how many intact records of the last run's round follow
/// its count in sequence (written but not yet acknowledged at the kill).
fn check_log(log: &[u8], what: &str, want: &[(u64, u64)]) -> u64 {
    let mut at = 0;
    for &(round, n) in want {
        for seq in 0..n {
            let got = parse(log.get(at..at + RECORD));
            assert_eq!(
                got,
                Some((round, seq)),
                "{what}: record {} (round {round}, seq {seq} of {n} acknowledged) is not intact; log is {} bytes",
                at / RECORD,
                log.len()
            );
            at += RECORD;
        }
    }
    let &(round, n) = want.last().expect("a run");
    (n..)
        .take_while(|&seq| {
            let ok = parse(log.get(at..at + RECORD)) == Some((round, seq));
            at += RECORD;
            ok
        })
        .count() as u64
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A writer's ops done, and its error with whether the kill had begun.
type Outcome = (u64, Option<(String, bool)>);

/// The writers of one round. Dropping them (also on panic) stops the
/// threads and kills the fsx this test started, by its pid.
struct Writers {
    killed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    fsynced: Arc<AtomicU64>,
    threads: Vec<(&'static str, JoinHandle<Outcome>)>,
    fsx: Option<(Child, PathBuf)>,
}

/// Runs `op` until `stop` or its first error: (ops done, the error and
/// whether the kill had begun when it came).
fn worker(
    killed: &Arc<AtomicBool>,
    stop: &Arc<AtomicBool>,
    mut op: impl FnMut(u64) -> io::Result<()> + Send + 'static,
) -> JoinHandle<Outcome> {
    let (killed, stop) = (killed.clone(), stop.clone());
    std::thread::spawn(move || {
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            if let Err(e) = op(n) {
                return (n, Some((format!("op {n}: {e}"), killed.load(Ordering::SeqCst))));
            }
            n += 1;
        }
        (n, None)
    })
}

impl Writers {
    fn start(m: &Mounted, round: u64, rng: &mut Rng) -> Writers {
        let (killed, stop) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let fsynced = Arc::new(AtomicU64::new(0));
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(m.path("log"))
            .expect("open log");
        let n = fsynced.clone();
        let mut threads = vec![(
            "log",
            worker(&killed, &stop, move |seq| {
                log.write_all(&record(round, seq))?;
                log.sync_data()?;
                n.store(seq + 1, Ordering::SeqCst);
                Ok(())
            }),
        )];
        let mut fsx = None;
        if round.is_multiple_of(2) {
            let out = m.dir.path().join(format!("fsx-{round}.out"));
            let child = Command::new(fsx_bin())
                .args(["-N", "100000000", "-S", &rng.below(1 << 30).to_string(), "-P"])
                .arg(m.dir.path())
                .arg(m.path("fsx.dat"))
                .stdin(Stdio::null())
                .stdout(File::create(&out).unwrap())
                .stderr(File::create(out.with_extension("err")).unwrap())
                .spawn()
                .expect("spawn fsx");
            fsx = Some((child, out));
        } else {
            let dir = m.path("churn");
            fs::create_dir_all(&dir).expect("mkdir churn");
            let big = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(dir.join("big"))
                .expect("open big");
            let mut r = Rng(rng.below(u64::MAX) | 1);
            let name = move |i: u64| dir.join(format!("f{}", i % 64));
            threads.push((
                "churn",
                worker(&killed, &stop, move |i| {
                    let missing_ok = |res: io::Result<()>| match res {
                        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                        res => res,
                    };
                    match r.below(10) {
                        0..=4 => big.write_all_at(&noise(1 + r.below(65536) as usize, i), r.below(4 << 20)),
                        5 => big.sync_data(),
                        6 => fs::write(name(r.below(64)), noise(r.below(8192) as usize, i)),
                        7 => missing_ok(fs::rename(name(r.below(64)), name(r.below(64)))),
                        8 => missing_ok(fs::remove_file(name(r.below(64)))),
                        _ => big.set_len(r.below(4 << 20)),
                    }
                }),
            ));
        }
        Writers {
            killed,
            stop,
            fsynced,
            threads,
            fsx,
        }
    }

    /// Panics if a writer failed or fsx ended before the kill.
    fn assert_running(&mut self) {
        if let Some((c, out)) = &mut self.fsx
            && let Some(st) = c.try_wait().expect("wait fsx")
        {
            let log = fs::read_to_string(&*out).unwrap_or_default()
                + &fs::read_to_string(out.with_extension("err")).unwrap_or_default();
            panic!("fsx ended ({st}) before the kill:\n{log}");
        }
        for (what, t) in &self.threads {
            assert!(!t.is_finished(), "the {what} writer stopped before the kill");
        }
    }

    /// After the kill: stops and joins the threads and kills fsx; returns
    /// (records fsync'd, ops per writer). A writer error before the kill fails.
    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some((mut c, _)) = self.fsx.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut summary = Vec::new();
        for (what, t) in self.threads.drain(..) {
            while !t.is_finished() {
                assert!(
                    Instant::now() < deadline,
                    "the {what} writer still blocked 30 s after the kill"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            let (ops, err) = t.join().expect("writer thread");
            if let Some((e, after_kill)) = &err {
                assert!(after_kill, "the {what} writer failed before the kill: {e}");
            }
            summary.push(format!(
                "{what}: {ops} ops, then {}",
                err.map_or("stopped".into(), |e| e.0)
            ));
        }
        (self.fsynced.load(Ordering::SeqCst), summary)
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some((mut c, _)) = self.fsx.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn fsx_bin() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/root/.cargo/bin")])
        .map(|d| d.join("fsx"))
        .find(|p| p.is_file())
        .expect("fsx not found (see .ci/install.sh)")
}

fn mirrorfs(args: &[&str], mnt: &Path) -> (i32, String, Vec<u8>) {
    let out = run_within(Command::new(BIN).args(args).arg(mnt), Duration::from_secs(120));
    (out.status.code().unwrap_or(-1), text(&out), out.stdout)
}

/// Polls `status --json` until HEALTHY; returns how long that took.
fn wait_healthy(mnt: &Path, round: u64) -> Duration {
    let t0 = Instant::now();
    loop {
        let (_, all, stdout) = mirrorfs(&["status", "--json"], mnt);
        let st: Value = serde_json::from_slice(&stdout).unwrap_or_else(|e| panic!("status --json ({e}):\n{all}"));
        if st["state"] == "HEALTHY" {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "round {round}: not HEALTHY 120 s after the remount:\n{st:#}\nevents:\n{:#?}",
            events(mnt)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn kill_9_during_writes_loses_no_fsynced_write_and_sides_agree_after_remount() {
    let test = "kill_9_during_writes_loses_no_fsynced_write_and_sides_agree_after_remount";
    let Some(mut m) = Mounted::on_sides(test, None, None, OPTS) else {
        return;
    };
    let mut rng = Rng(SEED);
    // The log's records as (round, count) runs, checked again every round.
    let mut kept: Vec<(u64, u64)> = Vec::new();
    let (mut recoveries, mut last_seq, mut acked, mut unacked) = (0, 0, 0, 0);
    for ev in events(&m.mnt) {
        last_seq = last_seq.max(ev["seq"].as_u64().unwrap_or(0));
    }
    println!("seed {SEED:#x}, {ROUNDS} rounds");
    for round in 0..ROUNDS {
        let mut w = Writers::start(&m, round, &mut rng);
        let delay = Duration::from_millis(150 + rng.below(751));
        std::thread::sleep(delay);
        w.assert_running();
        w.killed.store(true, Ordering::SeqCst);
        m.kill9();
        let (fsynced, summary) = w.finish();

        m.respawn(OPTS);
        let took = wait_healthy(&m.mnt, round);
        let new: Vec<Value> = events(&m.mnt)
            .into_iter()
            .filter(|e| e["seq"].as_u64().unwrap_or(0) > last_seq)
            .collect();
        last_seq = new.iter().filter_map(|e| e["seq"].as_u64()).fold(last_seq, u64::max);
        let crash: Vec<&Value> = new.iter().filter(|e| e["event"] == "crash_recovery").collect();
        recoveries += crash.len();
        let (code, all, _) = mirrorfs(&["verify"], &m.mnt);
        assert_eq!(
            code, 0,
            "round {round}: online verify after the remount:\n{all}\nevents:\n{new:#?}"
        );

        kept.push((round, fsynced));
        let log = fs::read(m.path("log")).expect("read log through the mount");
        let extra = check_log(&log, &format!("round {round}: mount log"), &kept);
        for side in [&m.primary, &m.mirror] {
            let on_side = fs::read(side.join("log")).expect("read a side's log");
            assert!(
                on_side == log,
                "round {round}: {}/log differs from the log read through the mount",
                side.display()
            );
        }
        // Keep the intact records; drop a torn tail so the next round's
        // records start on a record boundary.
        kept.last_mut().unwrap().1 += extra;
        let len: u64 = kept.iter().map(|&(_, n)| n * RECORD as u64).sum();
        let f = OpenOptions::new().write(true).open(m.path("log")).unwrap();
        f.set_len(len)
            .and_then(|_| f.sync_all())
            .expect("truncate the log to its intact records");
        acked += fsynced;
        unacked += extra;
        println!(
            "round {round:2}: killed after {:3} ms; {fsynced} records fsync'd (+{extra} more intact); {}; HEALTHY {:.2} s after remount; {}",
            delay.as_millis(),
            summary.join("; "),
            took.as_secs_f64(),
            crash.first().map_or("no crash_recovery".into(), |e| format!(
                "crash_recovery: {}",
                e["detail"]
            ))
        );
    }
    println!(
        "totals: {ROUNDS} kills, {recoveries} crash_recovery events, {acked} fsync'd records all kept, {unacked} records written but unacknowledged kept"
    );
    assert!(
        recoveries >= 1,
        "no round raised crash_recovery: the write-intent path was not exercised"
    );
    m.unmount();
    let spec = format!("{}|{}", m.primary.display(), m.mirror.display());
    let out = run_within(Command::new(BIN).arg("verify").arg(&spec), Duration::from_secs(120));
    assert!(out.status.success(), "offline verify {spec}:\n{}", text(&out));
    for side in [&m.primary, &m.mirror] {
        check_log(&fs::read(side.join("log")).unwrap(), &side.display().to_string(), &kept);
    }
    m.assert_identical();
}

/// A restart right after `kill -9`, as systemd's `Restart=on-failure` does
/// it, mounts every time: the new daemon waits for the killed one to finish
/// exiting and detaches its dead mount, instead of refusing the mountpoint
/// or the side locks as in use.
#[test]
fn mount_right_after_kill_9_succeeds_in_20_rounds_of_20() {
    let test = "mount_right_after_kill_9_succeeds_in_20_rounds_of_20";
    let Some(mut m) = Mounted::on_sides(test, None, None, OPTS) else {
        return;
    };
    let mut slowest = Duration::ZERO;
    for round in 0..ROUNDS {
        // A file open in the mount across the kill, as a database holds one.
        let mut f = File::create(m.path(&format!("r{round}"))).expect("create through the mount");
        f.write_all(&record(round, 0))
            .and_then(|_| f.sync_all())
            .expect("write and fsync through the mount");
        let took = m.kill9_and_restart(OPTS);
        drop(f);
        slowest = slowest.max(took);
        wait_healthy(&m.mnt, round);
        for r in 0..=round {
            let got = fs::read(m.path(&format!("r{r}"))).expect("read through the new mount");
            assert!(got == record(r, 0), "round {round}: r{r} differs after the restart");
        }
    }
    println!("{ROUNDS} restarts right after kill -9; the slowest answered status after {slowest:?}");
    m.unmount();
    m.assert_identical();
}
