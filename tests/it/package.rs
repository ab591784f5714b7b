//! The Debian package, as an operator meets it: built with `cargo deb`,
//! installed with `apt install ./mirrorfs_*.deb`, then used only through
//! what it installed: the man pages, the completions, the mount helper from
//! an fstab line (`mount` and `mount -a`), the systemd units (checked with
//! `systemd-analyze verify`, their ExecStart lines run as systemd runs
//! them), and finally removed, leaving nothing behind.
//!
//! It installs into the machine, so nextest runs it alone
//! (`.config/nextest.toml`).

use std::collections::HashMap;
use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{fuse_available, is_mounted, open_tempdir, run, run_within};
use crate::metrics::promtool_check;
use crate::workloads::text;

const INSTALLED: &str = "/usr/bin/mirrorfs";
const HELPER: &str = "/usr/sbin/mount.fuse.mirrorfs";
const UNIT_DIR: &str = "/lib/systemd/system";
const LIMIT: Duration = Duration::from_secs(60);

/// True if `cargo deb` can run here; otherwise says so loudly, and fails
/// under CI=true (where `.ci/install.sh` installs it).
fn cargo_deb_available() -> bool {
    let found = Command::new(env!("CARGO"))
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        let why = "package test: CANNOT RUN: cargo-deb is missing (cargo install cargo-deb)";
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{why} -- failing because CI=true"
        );
        eprintln!("\n!!!!!!!! {why} -- NOT TESTED !!!!!!!!\n");
    }
    found
}

fn must(cmd: &mut Command, what: &str) -> Output {
    must_within(cmd, what, LIMIT)
}

fn must_within(cmd: &mut Command, what: &str, limit: Duration) -> Output {
    let out = run_within(cmd, limit);
    assert!(out.status.success(), "{what}: {cmd:?}:\n{}", text(&out));
    out
}

/// Removes the package and whatever the test left mounted or configured,
/// even when the test fails half-way.
struct Installed {
    mounts: Vec<PathBuf>,
    files: Vec<PathBuf>,
    /// Directories the test made outside its temporary one, removed if empty.
    dirs: Vec<PathBuf>,
}

impl Drop for Installed {
    fn drop(&mut self) {
        for m in &self.mounts {
            if is_mounted(m) {
                let _ = Command::new("umount").arg(m).status();
            }
            if is_mounted(m) {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
        for f in &self.files {
            let _ = fs::remove_file(f);
        }
        for d in &self.dirs {
            let _ = fs::remove_dir(d);
        }
        let _ = Command::new("apt-get")
            .args(["purge", "-y", "-q", "mirrorfs"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status();
    }
}

/// Builds the package into `dir` and returns its path.
fn build_deb(dir: &Path) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    // From a clean tree this compiles everything in the deb profile.
    must_within(
        Command::new(env!("CARGO"))
            .args(["deb", "--quiet", "--manifest-path"])
            .arg(&manifest)
            .arg("--output")
            .arg(dir),
        "cargo deb",
        Duration::from_secs(1200),
    );
    let debs: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "cargo deb made {debs:?}");
    debs[0].clone()
}

/// The files (not directories) the package holds, as installed paths.
fn package_files(deb: &Path) -> Vec<PathBuf> {
    let out = must(Command::new("dpkg-deb").arg("-c").arg(deb), "dpkg-deb -c");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| PathBuf::from(p.trim_start_matches('.')))
        .collect()
}

fn check_man_pages() {
    for page in ["mirrorfs", "mirrorfs-status", "mirrorfs-mount", "mirrorfs-metrics"] {
        let out = must(
            Command::new("man").args(["-P", "cat", page]).env("MANWIDTH", "100"),
            "man",
        );
        let txt = String::from_utf8_lossy(&out.stdout);
        assert!(txt.contains("SYNOPSIS"), "man {page}:\n{txt}");
    }
    let out = must(Command::new("man").args(["-P", "cat", "mirrorfs"]), "man mirrorfs");
    let txt = String::from_utf8_lossy(&out.stdout);
    for section in [
        "MOUNT OPTIONS",
        "EXIT STATUS",
        "EVENTS",
        "FILES",
        "EXAMPLES",
        "side_timeout=S",
        "fstab",
    ] {
        assert!(txt.contains(section), "man mirrorfs lacks {section}:\n{txt}");
    }
}

fn check_completions() {
    // bash: the completion function offers subcommands and side names.
    let script = "source /usr/share/bash-completion/completions/mirrorfs; \
                  COMP_WORDS=(mirrorfs st); COMP_CWORD=1; _mirrorfs mirrorfs st mirrorfs; echo \"${COMPREPLY[@]}\"; \
                  COMP_WORDS=(mirrorfs fail /mnt ''); COMP_CWORD=3; _mirrorfs mirrorfs '' /mnt; echo \"${COMPREPLY[@]}\"";
    let out = must(Command::new("bash").args(["-c", script]), "bash completion");
    let txt = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = txt.lines().collect();
    assert_eq!(
        lines.first(),
        Some(&"status"),
        "bash completion of 'mirrorfs st':\n{txt}"
    );
    assert!(
        lines
            .get(1)
            .is_some_and(|l| l.contains("primary") && l.contains("mirror")),
        "bash completion of 'mirrorfs fail /mnt ':\n{txt}"
    );
    // fish: its own completer, from vendor_completions.d.
    let out = must(
        Command::new("fish").args(["-c", "complete -C 'mirrorfs st'"]),
        "fish completion",
    );
    let txt = String::from_utf8_lossy(&out.stdout);
    assert!(txt.starts_with("status\t"), "fish completion of 'mirrorfs st':\n{txt}");
    // zsh: on its default fpath, parsed cleanly, declared for mirrorfs.
    let out = must(
        Command::new("zsh").args([
            "-fc",
            "for d in $fpath; do [[ -f $d/_mirrorfs ]] && print $d/_mirrorfs; done; true",
        ]),
        "zsh fpath",
    );
    let found = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!found.is_empty(), "_mirrorfs is on no directory of zsh's fpath");
    must(Command::new("zsh").args(["-n", &found]), "zsh -n _mirrorfs");
    let head = fs::read_to_string(&found).unwrap();
    assert!(
        head.starts_with("#compdef mirrorfs"),
        "{found}: {}",
        &head[..head.len().min(80)]
    );
}

/// `mount` and `mount -a` with an fstab line, through the installed helper;
/// an unknown option is refused with mirrorfs's message.
fn check_fstab(dir: &Path, guard: &mut Installed) {
    let (d1, d2, mnt) = (dir.join("d1/data"), dir.join("d2/data"), dir.join("srv/data"));
    for d in [&d1, &d2, &mnt] {
        fs::create_dir_all(d).unwrap();
    }
    guard.mounts.push(mnt.clone());
    let fstab = dir.join("fstab");
    let line = format!(
        "{}|{} {} fuse.mirrorfs allow_other,nofail,side_timeout=5,probe_interval=2 0 0\n",
        d1.display(),
        d2.display(),
        mnt.display()
    );
    fs::write(&fstab, &line).unwrap();
    for (name, args) in [
        ("mount", vec!["-T", fstab.to_str().unwrap(), mnt.to_str().unwrap()]),
        ("mount-a", vec!["-a", "-T", fstab.to_str().unwrap()]),
    ] {
        must(Command::new("mount").args(&args), "mount from fstab");
        assert!(is_mounted(&mnt), "mount {args:?} returned without a mount");
        let st = must(Command::new(INSTALLED).args(["status", "--json"]).arg(&mnt), "status");
        let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
        assert_eq!(v["state"], "HEALTHY", "{v:#}");
        let opts = v["options"].as_str().unwrap_or_default();
        assert!(opts.contains("side_timeout=5") && opts.contains("allow_other"), "{v:#}");
        fs::write(mnt.join(name), b"through fstab").unwrap();
        must(Command::new("umount").arg(&mnt), "umount");
        wait_unmounted(&mnt);
    }
    for name in ["mount", "mount-a"] {
        assert_eq!(
            fs::read(d2.join(name)).unwrap(),
            b"through fstab",
            "the mirror's {name}"
        );
    }
    let spec = format!("{}|{}", d1.display(), d2.display());
    let out = run(Command::new("mount")
        .args(["-t", "fuse.mirrorfs", "-o", "bogus=1", &spec])
        .arg(&mnt));
    assert!(
        !out.status.success() && !is_mounted(&mnt),
        "an unknown option mounted:\n{}",
        text(&out)
    );
    assert!(
        text(&out).contains("mirrorfs: unknown mount option 'bogus=1'"),
        "mount(8) did not pass on mirrorfs's message:\n{}",
        text(&out)
    );
}

fn wait_unmounted(mnt: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_mounted(mnt) {
        assert!(
            Instant::now() < deadline,
            "{} still mounted 10 s after umount",
            mnt.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn check_units_verify(dir: &Path) {
    for unit in [
        "mirrorfs@pkgtest.service",
        "mirrorfs-metrics.service",
        "mirrorfs-metrics.timer",
    ] {
        must(
            Command::new("systemd-analyze").args(["verify", unit]),
            "systemd-analyze verify",
        );
    }
    // The check is not vacuous: a broken copy of the unit is refused.
    let broken = dir.join("mirrorfs-broken@.service");
    let unit = fs::read_to_string(Path::new(UNIT_DIR).join("mirrorfs@.service")).unwrap();
    fs::write(&broken, unit.replace("ExecStart=/usr/bin/", "ExecStart=usr/bin/")).unwrap();
    let out = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("{}:mirrorfs-broken@x.service", broken.display())));
    assert!(
        !out.status.success(),
        "systemd-analyze verify passed a relative ExecStart:\n{}",
        text(&out)
    );
}

/// The `ExecStart=` line of an installed unit, with `%i` and `${VAR}`
/// expanded as systemd does (`${VAR}` is one word), split into words.
fn exec_start(unit: &str, instance: &str, env: &HashMap<String, String>) -> Vec<String> {
    let text = fs::read_to_string(Path::new(UNIT_DIR).join(unit)).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap_or_else(|| panic!("{unit} has no ExecStart"));
    line.split_whitespace()
        .map(|w| {
            let w = w.replace("%i", instance).replace("%I", instance);
            match w.strip_prefix("${").and_then(|v| v.strip_suffix('}')) {
                Some(var) => env.get(var).cloned().unwrap_or_default(),
                None => w,
            }
        })
        .collect()
}

/// An EnvironmentFile as systemd reads it: KEY=VALUE lines, `#` comments.
fn environment_file(path: &Path) -> HashMap<String, String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}

/// Starts `argv` as systemd starts a `Type=notify` service and waits for
/// READY=1 on its notify socket.
fn start_notify(argv: &[String], dir: &Path, round: usize) -> Child {
    let sock_path = dir.join(format!("notify{round}"));
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .env("NOTIFY_SOCKET", &sock_path)
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("ExecStart {argv:?}: {e}"));
    let mut buf = [0u8; 256];
    let n = sock
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no READY=1 within 30 s from {argv:?}: {e}"));
    let msg = String::from_utf8_lossy(&buf[..n]);
    assert!(msg.contains("READY=1"), "notify message: {msg}");
    assert!(
        msg.contains(&format!("MAINPID={}", child.id())),
        "notify message: {msg}"
    );
    child
}

/// The template unit's ExecStart, from the installed example configuration:
/// READY once the mount is live, a restart right after `kill -9` (what
/// `Restart=on-failure` does), and SIGTERM (what `systemctl stop` sends)
/// unmounts and ends it cleanly. While it runs, the metrics service.
fn check_exec_start(dir: &Path, guard: &mut Installed) {
    let example = Path::new("/usr/share/doc/mirrorfs/examples/srv-data.conf");
    let (p, m, mnt) = (dir.join("unit/p"), dir.join("unit/m"), dir.join("unit/mnt"));
    for d in [&p, &m, &mnt] {
        fs::create_dir_all(d).unwrap();
    }
    guard.mounts.push(mnt.clone());
    let conf = fs::read_to_string(example)
        .unwrap()
        .replace("/disk1/data|/disk2/data", &format!("{}|{}", p.display(), m.display()))
        .replace("MOUNTPOINT=/srv/data", &format!("MOUNTPOINT={}", mnt.display()));
    if !Path::new("/etc/mirrorfs").exists() {
        guard.dirs.push(PathBuf::from("/etc/mirrorfs"));
    }
    fs::create_dir_all("/etc/mirrorfs").unwrap();
    let conf_path = PathBuf::from("/etc/mirrorfs/pkgtest.conf");
    fs::write(&conf_path, conf).unwrap();
    guard.files.push(conf_path.clone());
    let env = environment_file(&conf_path);
    let argv = exec_start("mirrorfs@.service", "pkgtest", &env);
    assert_eq!(argv[0], INSTALLED, "{argv:?}");

    let mut first = start_notify(&argv, dir, 0);
    assert!(is_mounted(&mnt), "READY=1 before the mount was live");
    fs::write(mnt.join("before-crash"), b"kept").unwrap();
    let _ = first.kill();
    let mut second = start_notify(&argv, dir, 1);
    let _ = first.wait();
    assert_eq!(fs::read(mnt.join("before-crash")).unwrap(), b"kept");
    check_metrics_service(&mnt);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = second.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the daemon did not end 20 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "the daemon ended with {status} after SIGTERM");
    assert!(!is_mounted(&mnt), "still mounted after SIGTERM");
    assert_eq!(fs::read(m.join("before-crash")).unwrap(), b"kept");
}

/// The metrics service's ExecStart writes a file, which promtool accepts,
/// that shows the live mount at `mnt`.
fn check_metrics_service(mnt: &Path) {
    let argv = exec_start("mirrorfs-metrics.service", "", &HashMap::new());
    let out_file = argv
        .iter()
        .skip_while(|a| *a != "--output")
        .nth(1)
        .cloned()
        .expect("the metrics service writes with --output");
    let dir = Path::new(&out_file).parent().unwrap().to_path_buf();
    let made = !dir.exists();
    fs::create_dir_all(&dir).unwrap();
    let out = run_within(Command::new(&argv[0]).args(&argv[1..]), LIMIT);
    let written = fs::read_to_string(&out_file);
    let _ = fs::remove_file(&out_file);
    if made {
        let _ = fs::remove_dir(&dir);
    }
    assert!(out.status.success(), "{argv:?}:\n{}", text(&out));
    let written = written.expect("the metrics file");
    let up = format!("mirrorfs_up{{mountpoint=\"{}\"}} 1\n", mnt.display());
    assert!(written.contains(&up), "no {up} in:\n{written}");
    promtool_check(&written);
}

#[test]
fn the_package_installs_works_and_removes_cleanly() {
    if !fuse_available("the_package_installs_works_and_removes_cleanly") || !cargo_deb_available() {
        return;
    }
    let t = open_tempdir();
    let deb = build_deb(t.path());
    let files = package_files(&deb);
    for want in [
        INSTALLED,
        HELPER,
        "/lib/systemd/system/mirrorfs@.service",
        "/usr/share/man/man8/mirrorfs.8",
    ] {
        assert!(
            files.iter().any(|f| f == Path::new(want)),
            "the package lacks {want}: {files:?}"
        );
    }
    let mut guard = Installed {
        mounts: Vec::new(),
        files: Vec::new(),
        dirs: Vec::new(),
    };
    must(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .arg(&deb)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt install ./mirrorfs_*.deb",
    );
    for f in &files {
        assert!(f.symlink_metadata().is_ok(), "{} not installed", f.display());
    }
    assert_eq!(fs::read_link(HELPER).unwrap().file_name().unwrap(), "mirrorfs");

    check_man_pages();
    check_completions();
    check_fstab(t.path(), &mut guard);
    check_units_verify(t.path());
    check_exec_start(t.path(), &mut guard);

    must(
        Command::new("apt-get")
            .args(["remove", "-y", "-q", "mirrorfs"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt remove mirrorfs",
    );
    let left: Vec<&PathBuf> = files.iter().filter(|f| f.symlink_metadata().is_ok()).collect();
    assert!(left.is_empty(), "apt remove left {left:?}");
    // dpkg keeps a removed package with maintainer scripts as
    // "config-files" until a purge; it must have no config file to keep.
    let out = run(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "mirrorfs"]));
    let conffiles = String::from_utf8_lossy(&out.stdout);
    assert!(conffiles.trim().is_empty(), "apt remove kept config files: {conffiles}");
    must(
        Command::new("apt-get")
            .args(["purge", "-y", "-q", "mirrorfs"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt purge mirrorfs",
    );
    let out = run(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Status}", "mirrorfs"]));
    let state = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() || state == "not-installed",
        "after apt purge, dpkg says: {state}"
    );
}
