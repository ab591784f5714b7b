//! Reference workloads through the mount: pjdfstest, fsx (with mmap),
//! PostgreSQL (pgbench, non-root, checksums) and SQLite (rollback journal
//! and WAL). Each ends with identical sides.
//!
//! The tools come from .ci/install.sh; a missing tool fails the test.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{BIN, Mounted, fuse_available, ok, open_tempdir, run, run_within};
use crate::faults::{Zram, ZramMount};

pub(crate) fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Finds a tool on PATH or in root's cargo bin (where `cargo install` puts it).
fn tool(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(h) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(h).join("bin"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(h).join(".cargo/bin"));
    }
    dirs.push("/root/.cargo/bin".into());
    dirs.push("/usr/lib/postgresql/15/bin".into());
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found (see .ci/install.sh)"))
}

// ---------------------------------------------------------------- pjdfstest

/// pjdfstest failures that are inherent to FUSE or to the mirrorfs design,
/// each investigated: (test name as pjdfstest prints it, reason).
/// None so far: mirrorfs fails no pjdfstest test.
const EXPECTED_FAILURES: &[(&str, &str)] = &[];

/// Skips allowed (ext4 skips 22, all config-driven; mirrorfs one more), by
/// name prefix or infix: (pattern, reason).
const EXPECTED_SKIPS: &[(&str, &str)] = &[
    (
        "erofs_",
        "allow_remount = false: no `mount -o remount,ro` (ext4 skips these too)",
    ),
    ("exdev_", "no PJDFSTEST_SECONDARY_FS given (ext4 skips these too)"),
    (
        "rename::changed_ctime_success",
        "feature rename_ctime is off (ext4 skips these too)",
    ),
    (
        "link::link_count_max",
        "FUSE: glibc pathconf(_PC_LINK_MAX) answers its 127 default for f_type FUSE_SUPER_MAGIC, which pjdfstest reads as unknown",
    ),
];

struct PjdResult {
    passed: u32,
    failed: u32,
    skipped: u32,
    failures: BTreeSet<String>,
}

fn parse_pjdfstest(out: &str) -> PjdResult {
    let summary = out
        .lines()
        .find_map(|l| l.strip_prefix("pjdfstest: "))
        .unwrap_or_else(|| panic!("no 'pjdfstest: ...' summary in:\n{out}"));
    let count = |what: &str| -> u32 {
        summary
            .split(", ")
            .find_map(|p| p.strip_suffix(what).map(|n| n.trim().parse::<u32>().expect("count")))
            .unwrap_or_else(|| panic!("no '{what}' in summary {summary:?}"))
    };
    let failures = out
        .lines()
        .filter_map(|l| l.strip_prefix("FAILED "))
        .map(|s| s.trim().to_string())
        .collect();
    PjdResult {
        passed: count(" passed"),
        failed: count(" failed"),
        skipped: count(" skipped"),
        failures,
    }
}

#[test]
fn pjdfstest_matches_ext4() {
    let Some(m) = Mounted::new("pjdfstest_matches_ext4", "allow_other") else {
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/pjdfstest.sh");
    let log = m.dir.path().join("pjdfstest.log");
    let t0 = Instant::now();
    let out = run(Command::new("bash")
        .arg(&script)
        .arg(&m.mnt)
        .arg(&log)
        .stdin(Stdio::null()));
    let all = text(&out);
    assert!(
        out.status.success(),
        "pjdfstest.sh could not run ({}):\n{all}",
        out.status
    );
    let r = parse_pjdfstest(&all);
    println!(
        "pjdfstest on mirrorfs: {} passed, {} failed, {} skipped ({:.0} s; ext4: 376 passed, 0 failed, 22 skipped)",
        r.passed,
        r.failed,
        r.skipped,
        t0.elapsed().as_secs_f64()
    );
    for f in &r.failures {
        println!("  FAILED {f}");
    }
    assert_eq!(
        r.failures.len() as u32,
        r.failed,
        "failed count does not match the FAILED lines:\n{all}"
    );
    assert!(r.passed > 0, "no test passed:\n{all}");
    // Every skip is a known one: a new skip would hide a lost feature.
    let full = std::fs::read_to_string(&log).expect("pjdfstest log");
    let skips: Vec<&str> = full
        .lines()
        .filter(|l| l.trim_end().ends_with(" skipped"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        skips.len() as u32,
        r.skipped,
        "skipped count does not match the log:\n{full}"
    );
    let odd: Vec<&&str> = skips
        .iter()
        .filter(|s| !EXPECTED_SKIPS.iter().any(|(p, _)| s.contains(p)))
        .collect();
    assert!(odd.is_empty(), "unexpected pjdfstest skips: {odd:?}\n{full}");
    let expected: BTreeSet<&str> = EXPECTED_FAILURES.iter().map(|(n, _)| *n).collect();
    let unexpected: Vec<&String> = r.failures.iter().filter(|f| !expected.contains(f.as_str())).collect();
    if !unexpected.is_empty() {
        panic!(
            "unexpected pjdfstest failures: {unexpected:?}\n--- full pjdfstest output ({}) ---\n{full}",
            log.display()
        );
    }
    m.finish();
}

// ---------------------------------------------------------------- fsx

#[test]
fn fsx_100k_ops_with_mmap() {
    let Some(m) = Mounted::new("fsx_100k_ops_with_mmap", "allow_other") else {
        return;
    };
    let t0 = Instant::now();
    let out = run(Command::new(tool("fsx"))
        .args(["-N", "100000", "-S", "42", "-P"])
        .arg(&m.mnt)
        .arg(m.path("fsx.dat"))
        .stdin(Stdio::null()));
    let secs = t0.elapsed().as_secs_f64();
    let all = text(&out);
    println!("fsx: 100000 ops in {secs:.1} s ({:.1} s per 10k ops)", secs / 10.0);
    assert!(out.status.success(), "fsx failed ({}):\n{all}", out.status);
    assert!(
        all.contains("All operations completed A-OK!"),
        "fsx did not report A-OK:\n{all}"
    );
    m.finish();
}

// ---------------------------------------------------------------- PostgreSQL

pub(crate) const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn postgres_ids() -> (nix::unistd::Uid, nix::unistd::Gid) {
    let u = nix::unistd::User::from_name("postgres")
        .expect("getpwnam")
        .expect("user postgres missing (postgresql-15)");
    (u.uid, u.gid)
}

/// A command run as user postgres, from a directory postgres can reach.
pub(crate) fn as_postgres(prog: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"])
        .arg(Path::new(PG_BIN).join(prog))
        .current_dir("/")
        .env("HOME", "/tmp")
        .env("LC_ALL", "C")
        .env_remove("PGDATA")
        .env_remove("PGHOST")
        .env_remove("PGPORT")
        .env_remove("PGUSER")
        .env_remove("PGDATABASE")
        .stdin(Stdio::null());
    c
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running postgres; dropping it (also on panic) stops it with -m immediate.
pub(crate) struct PgServer {
    data: PathBuf,
    pub(crate) sockdir: PathBuf,
    pub(crate) port: u16,
    pub(crate) log: PathBuf,
    /// The postmaster, from `postmaster.pid` once it started.
    pid: i32,
    running: bool,
}

impl PgServer {
    pub(crate) fn start(data: &Path, sockdir: &Path) -> PgServer {
        let port = free_port();
        let log = sockdir.join("postgres.log");
        let o = format!("-k {} -p {port} -c listen_addresses=''", sockdir.display());
        let mut s = PgServer {
            data: data.to_path_buf(),
            sockdir: sockdir.to_path_buf(),
            port,
            log,
            pid: 0,
            running: true,
        };
        let out = run(as_postgres("pg_ctl")
            .arg("-D")
            .arg(data)
            .arg("-l")
            .arg(&s.log)
            .args(["-o", &o, "-w", "-t", "120", "start"]));
        if !out.status.success() {
            let log = std::fs::read_to_string(&s.log).unwrap_or_default();
            panic!(
                "pg_ctl start failed ({}):\n{}\n--- server log ---\n{log}",
                out.status,
                text(&out)
            );
        }
        s.running = true;
        let pidfile = std::fs::read_to_string(data.join("postmaster.pid")).unwrap_or_default();
        s.pid = pidfile.lines().next().and_then(|l| l.trim().parse().ok()).unwrap_or(0);
        assert!(s.pid > 0, "no postmaster pid in {}/postmaster.pid", data.display());
        s
    }

    /// SIGKILL to the postmaster and every process under it (a crash of the
    /// machine, as PostgreSQL sees it); returns once they are gone.
    pub(crate) fn kill9(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        self.running = false;
        let mut all = crate::faults::descendants(self.pid);
        all.push(self.pid);
        for &p in &all {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while all.iter().any(|&p| crate::faults::alive(p)) {
            assert!(
                Instant::now() < deadline,
                "postgres processes {all:?} outlived SIGKILL by 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn pgbench(&self, args: &[&str]) -> String {
        let out = run(as_postgres("pgbench")
            .arg("-h")
            .arg(&self.sockdir)
            .args(["-p", &self.port.to_string()])
            .args(args)
            .arg("postgres"));
        let all = text(&out);
        if !out.status.success() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            panic!(
                "pgbench {args:?} failed ({}):\n{all}\n--- server log ---\n{log}",
                out.status
            );
        }
        all
    }

    pub(crate) fn stop(&mut self) {
        self.running = false;
        let out = run(as_postgres("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["stop", "-m", "fast", "-w", "-t", "120"]));
        if !out.status.success() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            panic!(
                "pg_ctl stop failed ({}):\n{}\n--- server log ---\n{log}",
                out.status,
                text(&out)
            );
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.running {
            let _ = as_postgres("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .args(["stop", "-m", "immediate", "-w"])
                .output();
        }
    }
}

/// initdb -k into `data` (an empty directory owned by postgres, mode 0700),
/// pgbench -i -s 10, then pgbench -c 4 -j 2 -T 30; returns the TPS.
fn pgbench_on(data: &Path, label: &str) -> f64 {
    let sock = open_tempdir();
    std::fs::set_permissions(sock.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let t0 = Instant::now();
    ok(as_postgres("initdb")
        .args(["-k", "-A", "trust", "-U", "postgres", "-D"])
        .arg(data));
    let t_initdb = t0.elapsed().as_secs_f64();
    let mut pg = PgServer::start(data, sock.path());
    let t1 = Instant::now();
    pg.pgbench(&["-i", "-s", "10"]);
    let t_init = t1.elapsed().as_secs_f64();
    let out = pg.pgbench(&["-c", "4", "-j", "2", "-T", "30"]);
    let outcome = PgbenchOutcome::of(&out);
    if let Some(n) = outcome.failed {
        assert_eq!(n, 0, "{label}: pgbench reported failed transactions:\n{out}");
    }
    let processed = outcome
        .processed
        .unwrap_or_else(|| panic!("{label}: no processed count:\n{out}"));
    assert!(processed > 0, "{label}: no transaction processed:\n{out}");
    let tps = out
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|v| v.split_whitespace().next())
        .map(|v| v.parse::<f64>().expect("tps"))
        .unwrap_or_else(|| panic!("{label}: no tps line:\n{out}"));
    pg.stop();
    println!(
        "{label}: initdb {t_initdb:.1} s, pgbench -i -s 10 {t_init:.1} s, {processed} transactions, tps {tps:.1}, total {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    tps
}

pub(crate) fn chown_postgres_0700(dir: &Path) {
    let (uid, gid) = postgres_ids();
    std::os::unix::fs::chown(dir, Some(uid.as_raw()), Some(gid.as_raw())).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
}

#[test]
fn postgres_pgbench_non_root() {
    let Some(mut m) = Mounted::new("postgres_pgbench_non_root", "allow_other") else {
        return;
    };
    chown_postgres_0700(&m.mnt);
    let t0 = Instant::now();
    let tps_fuse = pgbench_on(&m.mnt, "mirrorfs");
    let t_fuse = t0.elapsed().as_secs_f64();

    // The sides must be byte-identical and each a consistent cluster.
    m.unmount();
    m.assert_identical();
    for side in [&m.primary, &m.mirror] {
        let out = run(as_postgres("pg_checksums").arg("--check").arg("-D").arg(side));
        let all = text(&out);
        assert!(
            out.status.success(),
            "pg_checksums --check -D {} failed ({}):\n{all}",
            side.display(),
            out.status
        );
        assert!(
            all.contains("Bad checksums:  0"),
            "pg_checksums on {}:\n{all}",
            side.display()
        );
    }

    // The same workload on a plain directory, for comparison.
    let native = open_tempdir();
    let data = native.path().join("data");
    std::fs::create_dir(&data).unwrap();
    chown_postgres_0700(&data);
    let tps_native = pgbench_on(&data, "native");
    println!(
        "pgbench tps: mirrorfs={tps_fuse:.1} native={tps_native:.1} ratio={:.2}",
        tps_fuse / tps_native
    );
    println!("postgres on mirrorfs: {t_fuse:.1} s");
    m.finish();
}

// ---------------------------------------------------------------- SQLite

fn sqlite3(db: &Path, sql: &str) -> String {
    let mut child = Command::new(tool("sqlite3"))
        .arg("-batch")
        .arg("-bail")
        .arg(db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sqlite3");
    let mut stdin = child.stdin.take().unwrap();
    let input = sql.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().expect("sqlite3");
    let fed = writer.join().unwrap();
    let all = text(&out);
    // A sqlite3 that stopped early (-bail) closes its input: report its own error.
    assert!(
        out.status.success() && fed.is_ok(),
        "sqlite3 {} failed ({}):\n{all}",
        db.display(),
        out.status
    );
    assert!(
        out.stderr.is_empty(),
        "sqlite3 {} wrote to stderr:\n{all}",
        db.display()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// 10,000 single-row autocommit transactions in `mode`, then checks.
fn sqlite_workload(test: &str, mode: &str) {
    const ROWS: u32 = 10_000;
    let Some(mut m) = Mounted::new(test, "allow_other") else {
        return;
    };
    let db = m.path("test.db");
    let mut script = format!(
        "PRAGMA journal_mode={mode};\n\
         PRAGMA synchronous=FULL;\n\
         CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL, n INTEGER NOT NULL);\n\
         CREATE INDEX t_v ON t(v);\n"
    );
    for i in 0..ROWS {
        script.push_str(&format!(
            "INSERT INTO t(v, n) VALUES('row-{i:05}-{}', {i});\n",
            "x".repeat((i % 97) as usize)
        ));
    }
    let t0 = Instant::now();
    let out = sqlite3(&db, &script);
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(out.trim(), mode.to_lowercase(), "journal_mode not set");
    println!("sqlite {mode}: {ROWS} transactions in {secs:.1} s");

    let check = "PRAGMA journal_mode;\nPRAGMA integrity_check;\nSELECT count(*), sum(n) FROM t;\n";
    let sum = u64::from(ROWS) * u64::from(ROWS - 1) / 2;
    let want = format!("{}\nok\n{ROWS}|{sum}", mode.to_lowercase());
    assert_eq!(sqlite3(&db, check).trim(), want, "through the mount");
    // Both connections closed: no journal/WAL left behind.
    for suffix in ["-journal", "-wal", "-shm"] {
        let p = m.path(&format!("test.db{suffix}"));
        assert!(!p.exists(), "{} left behind after close", p.display());
    }

    // The backing file itself (opened immutable: no locks, no writes).
    m.unmount();
    m.assert_identical();
    let uri = format!("file:{}?immutable=1", m.primary.join("test.db").display());
    let out = sqlite3(
        Path::new(&uri),
        "PRAGMA integrity_check;\nSELECT count(*), sum(n) FROM t;\n",
    );
    assert_eq!(out.trim(), format!("ok\n{ROWS}|{sum}"), "primary side");
    m.finish();
}

#[test]
fn sqlite_rollback_journal() {
    sqlite_workload("sqlite_rollback_journal", "DELETE");
}

#[test]
fn sqlite_wal() {
    sqlite_workload("sqlite_wal", "WAL");
}

// ---------------------------------------------------------------- PostgreSQL through failure, heal and resync

/// `mirrorfs status --json MOUNTPOINT`: exit code and the object.
fn status_json(mnt: &Path) -> (i32, serde_json::Value) {
    let out = run_within(
        Command::new(BIN).args(["status", "--json"]).arg(mnt),
        Duration::from_secs(10),
    );
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json {}: not JSON ({e}):\n{}", mnt.display(), text(&out)));
    (out.status.code().unwrap_or(-1), v)
}

/// The state of `side` in a status object.
fn side_state(st: &serde_json::Value, side: &str) -> String {
    st["sides"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["side"] == side))
        .and_then(|s| s["state"].as_str())
        .unwrap_or_else(|| panic!("no {side} state in status:\n{st:#}"))
        .to_string()
}

/// Status and the event log of a mount, for a failure message.
fn diagnostics(mnt: &Path) -> String {
    let (code, st) = status_json(mnt);
    let evs = run_within(
        Command::new(BIN).args(["events", "--json"]).arg(mnt),
        Duration::from_secs(10),
    );
    format!(
        "--- status --json (exit {code}) ---\n{st:#}\n--- events --json ---\n{}",
        text(&evs)
    )
}

/// What psql -At prints for `sql`, trimmed.
pub(crate) fn psql_text(pg: &PgServer, sql: &str) -> String {
    let out = ok(as_postgres("psql")
        .arg("-h")
        .arg(&pg.sockdir)
        .args(["-p", &pg.port.to_string(), "-U", "postgres"])
        .args(["-At", "-X", "-v", "ON_ERROR_STOP=1"])
        .args(["-c", sql, "postgres"]));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// One count from psql -At.
pub(crate) fn psql_value(pg: &PgServer, sql: &str) -> u64 {
    let s = psql_text(pg, sql);
    s.parse().unwrap_or_else(|e| panic!("psql {sql:?}: {e}: {s:?}"))
}

/// pgbench's invariant: the balances of accounts, tellers and branches
/// each sum to the deltas in its history. Returns the history's rows.
pub(crate) fn assert_pgbench_invariant(pg: &PgServer, what: &str) -> u64 {
    let delta = psql_text(pg, "SELECT coalesce(sum(delta), 0) FROM pgbench_history");
    for (table, column) in [
        ("pgbench_accounts", "abalance"),
        ("pgbench_tellers", "tbalance"),
        ("pgbench_branches", "bbalance"),
    ] {
        let sum = psql_text(pg, &format!("SELECT coalesce(sum({column}), 0) FROM {table}"));
        assert_eq!(
            sum,
            delta,
            "{what}: sum({table}.{column}) against sum(pgbench_history.delta) ({} history rows)\n--- server log ---\n{}",
            psql_text(pg, "SELECT count(*) FROM pgbench_history"),
            std::fs::read_to_string(&pg.log).unwrap_or_default()
        );
    }
    psql_value(pg, "SELECT count(*) FROM pgbench_history")
}

/// What a pgbench run's output says about its clients.
pub(crate) struct PgbenchOutcome {
    /// Lines reporting an aborted client or a server error.
    pub client_errors: usize,
    /// "number of failed transactions", if reported.
    pub failed: Option<u64>,
    /// "number of transactions actually processed", if reported.
    pub processed: Option<u64>,
}

impl PgbenchOutcome {
    pub fn of(all: &str) -> PgbenchOutcome {
        let field = |name: &str| {
            all.lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .and_then(|v| v.split(['/', ' ']).find(|w| !w.is_empty()))
                .map(|v| v.parse::<u64>().unwrap_or_else(|e| panic!("{name} {v}: {e}")))
        };
        PgbenchOutcome {
            client_errors: all
                .lines()
                .filter(|l| l.contains("aborted") || l.contains("ERROR") || l.contains("FATAL") || l.contains("PANIC"))
                .count(),
            failed: field("number of failed transactions:"),
            processed: field("number of transactions actually processed:"),
        }
    }
}

/// pg_checksums --check on a stopped cluster directory.
pub(crate) fn assert_checksums(data: &Path) {
    let out = run(as_postgres("pg_checksums").arg("--check").arg("-D").arg(data));
    let all = text(&out);
    assert!(
        out.status.success() && all.contains("Bad checksums:  0"),
        "pg_checksums --check -D {} ({}):\n{all}",
        data.display(),
        out.status
    );
}

/// pgbench runs on while the mirror (a zram device) fails, heals and is
/// caught up: no client sees an error, the mount is HEALTHY again after an
/// automatic resync, the sides are byte-identical, each side is a
/// consistent cluster, and the mirror alone serves every committed row.
#[test]
fn pgbench_runs_through_mirror_failure_heal_and_resync() {
    let test = "pgbench_runs_through_mirror_failure_heal_and_resync";
    if !fuse_available(test) {
        return;
    }
    const BENCH_SECS: u64 = 60;
    let z = Zram::new("1G", ZramMount::Sync);
    let zside = z.side();
    let mut m = Mounted::on_sides(test, None, Some(&zside), "allow_other,probe_interval=1").unwrap();
    chown_postgres_0700(&m.mnt);
    let sock = open_tempdir();
    std::fs::set_permissions(sock.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    ok(as_postgres("initdb")
        .args(["-k", "-A", "trust", "-U", "postgres", "-D"])
        .arg(&m.mnt));
    let mut pg = PgServer::start(&m.mnt, sock.path());
    let t_init = Instant::now();
    pg.pgbench(&["-i", "-s", "10"]);
    eprintln!("{test}: pgbench -i -s 10 in {:.1} s", t_init.elapsed().as_secs_f64());

    let mut bench = as_postgres("pgbench");
    bench
        .arg("-h")
        .arg(&pg.sockdir)
        .args(["-p", &pg.port.to_string()])
        .args(["-c", "4", "-j", "2", "-T", &BENCH_SECS.to_string(), "postgres"]);
    let t0 = Instant::now();
    let runner = std::thread::spawn(move || run(&mut bench));

    std::thread::sleep(Duration::from_secs(8));
    z.fail();
    let t_fail = t0.elapsed();
    loop {
        let (_, st) = status_json(&m.mnt);
        if side_state(&st, "mirror") == "DOWN" {
            break;
        }
        assert!(
            t0.elapsed() - t_fail < Duration::from_secs(30),
            "the mirror is not DOWN 30 s after the zram failed\n{}",
            diagnostics(&m.mnt)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let t_down = t0.elapsed();
    let (code, st) = status_json(&m.mnt);
    assert_eq!(code, 2, "DEGRADED expected with the mirror down:\n{st:#}");
    std::thread::sleep(Duration::from_secs(8));
    assert!(
        !runner.is_finished(),
        "pgbench ended while the mirror was down ({:.1} s)",
        t0.elapsed().as_secs_f64()
    );
    z.heal();
    let t_heal = t0.elapsed();
    let mut seen_resyncing = false;
    let st = loop {
        let (code, st) = status_json(&m.mnt);
        seen_resyncing |= st["state"] == "RESYNCING" || side_state(&st, "mirror") == "RESYNCING";
        let last = &st["last_resync"];
        if code == 0 && st["state"] == "HEALTHY" && last["side"] == "mirror" && last["ok"] == true {
            break st;
        }
        assert!(
            t0.elapsed() - t_heal < Duration::from_secs(180),
            "not HEALTHY after a resync of the mirror within 180 s of the heal\n{}",
            diagnostics(&m.mnt)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let t_healthy = t0.elapsed();
    let bench_running_at_healthy = !runner.is_finished();
    eprintln!(
        "{test}: zram failed at {:.1} s, mirror DOWN at {:.1} s, healed at {:.1} s, HEALTHY at {:.1} s \
         (RESYNCING seen: {seen_resyncing}; pgbench still running: {bench_running_at_healthy}); last_resync: {}",
        t_fail.as_secs_f64(),
        t_down.as_secs_f64(),
        t_heal.as_secs_f64(),
        t_healthy.as_secs_f64(),
        st["last_resync"]
    );

    let out = runner.join().expect("pgbench thread");
    let all = text(&out);
    let PgbenchOutcome {
        client_errors,
        failed,
        processed,
    } = PgbenchOutcome::of(&all);
    eprintln!("{test}: pgbench: failed {failed:?}, processed {processed:?}, {client_errors} client error lines");
    if !out.status.success() || client_errors > 0 || failed != Some(0) || processed.is_none_or(|n| n == 0) {
        let log = std::fs::read_to_string(&pg.log).unwrap_or_default();
        panic!(
            "pgbench through the mirror's failure, heal and resync ({}):\n{all}\n--- server log ---\n{log}\n{}",
            out.status,
            diagnostics(&m.mnt)
        );
    }
    let history = psql_value(&pg, "SELECT count(*) FROM pgbench_history");
    let accounts = psql_value(&pg, "SELECT count(*) FROM pgbench_accounts");
    eprintln!("{test}: pgbench_history {history} rows, pgbench_accounts {accounts} rows");
    assert_eq!(accounts, 1_000_000, "pgbench_accounts through the mount");
    assert!(
        processed.is_some_and(|n| history >= n),
        "pgbench_history has {history} rows, pgbench processed {processed:?}"
    );
    pg.stop();

    // Byte-identical, online (both sides UP) and offline.
    let out = run_within(Command::new(BIN).arg("verify").arg(&m.mnt), Duration::from_secs(300));
    assert!(
        out.status.success(),
        "mirrorfs verify {} ({}):\n{}\n{}",
        m.mnt.display(),
        out.status,
        text(&out),
        diagnostics(&m.mnt)
    );
    m.unmount();
    let spec = format!("{}|{}", m.primary.display(), m.mirror.display());
    let out = run_within(Command::new(BIN).args(["verify", &spec]), Duration::from_secs(300));
    assert!(
        out.status.success(),
        "mirrorfs verify '{spec}' ({}):\n{}",
        out.status,
        text(&out)
    );
    m.assert_identical();
    for side in [&m.primary, &m.mirror] {
        assert_checksums(side);
    }

    // The mirror alone is a complete cluster with every committed row.
    let sock2 = open_tempdir();
    std::fs::set_permissions(sock2.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut alone = PgServer::start(&m.mirror, sock2.path());
    let accounts_m = psql_value(&alone, "SELECT count(*) FROM pgbench_accounts");
    let history_m = psql_value(&alone, "SELECT count(*) FROM pgbench_history");
    alone.stop();
    assert_eq!(accounts_m, 1_000_000, "pgbench_accounts on the mirror alone");
    assert_eq!(
        history_m, history,
        "pgbench_history on the mirror alone vs. through the mount"
    );
}
