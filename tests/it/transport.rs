//! Both ways requests reach the daemon: FUSE over io_uring, which a mount
//! uses when the kernel offers it, and `/dev/fuse`, which serves every
//! request when it does not. The rest of the suite runs on whichever the
//! machine gives (io_uring under CI, which turns the kernel's switch on);
//! these tests pin each transport down and run the same work through it.

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::{Mounted, ok};
use crate::failover::status_json;

const ENABLE: &str = "/sys/module/fuse/parameters/enable_uring";

/// The same work on either transport: every kind of request the daemon
/// answers with a body (entries, attributes, data, listings, xattrs,
/// statfs, lseek), and the changes, checked through the mount and on both
/// sides.
fn exercise(m: &Mounted) {
    fs::create_dir_all(m.path("d/e")).unwrap();
    let big: Vec<u8> = (0..(3u32 << 20) + 123).map(|i| (i % 253) as u8).collect();
    fs::write(m.path("d/big"), &big).unwrap();
    assert_eq!(fs::read(m.path("d/big")).unwrap(), big);
    let mut f = OpenOptions::new().read(true).write(true).open(m.path("d/big")).unwrap();
    f.write_all_at(b"patched", 1 << 20).unwrap();
    f.sync_all().unwrap();
    let mut back = [0u8; 7];
    f.read_exact_at(&mut back, 1 << 20).unwrap();
    assert_eq!(&back, b"patched");
    f.seek(SeekFrom::Start(5)).unwrap();
    let mut five = [0u8; 5];
    f.read_exact(&mut five).unwrap();
    assert_eq!(five, [5, 6, 7, 8, 9]);
    drop(f);
    for i in 0..300 {
        fs::write(m.path(&format!("d/e/file-with-a-long-name-{i:04}")), i.to_string()).unwrap();
    }
    let mut names: Vec<String> = fs::read_dir(m.path("d/e"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 300);
    assert_eq!(names[7], "file-with-a-long-name-0007");
    std::os::unix::fs::symlink("e/file-with-a-long-name-0001", m.path("d/link")).unwrap();
    assert_eq!(fs::read_to_string(m.path("d/link")).unwrap(), "1");
    assert_eq!(
        fs::read_link(m.path("d/link")).unwrap(),
        Path::new("e/file-with-a-long-name-0001")
    );
    fs::hard_link(m.path("d/big"), m.path("d/big2")).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::nlink(&fs::metadata(m.path("d/big")).unwrap()),
        2
    );
    fs::rename(m.path("d/big2"), m.path("d/e/moved")).unwrap();
    fs::remove_file(m.path("d/e/file-with-a-long-name-0000")).unwrap();
    ok(Command::new("setfattr")
        .args(["-n", "user.t", "-v", "value-1"])
        .arg(m.path("d/big")));
    let out = ok(Command::new("getfattr")
        .args(["-d", "--absolute-names"])
        .arg(m.path("d/big")));
    assert!(String::from_utf8_lossy(&out.stdout).contains("user.t=\"value-1\""));
    let st = nix::sys::statvfs::statvfs(&m.mnt).unwrap();
    assert!(st.blocks() > 0 && st.block_size() > 0);
    // A name looked up while missing is cached as missing (a negative
    // entry); making it through the mount must drop that.
    for _ in 0..3 {
        assert!(fs::metadata(m.path("d/later")).is_err());
    }
    fs::write(m.path("d/later"), b"now").unwrap();
    assert_eq!(fs::read(m.path("d/later")).unwrap(), b"now");
    fs::rename(m.path("d/later"), m.path("d/e/later")).unwrap();
    assert!(fs::metadata(m.path("d/later")).is_err());
    fs::rename(m.path("d/e/later"), m.path("d/later")).unwrap();
    assert_eq!(fs::read(m.path("d/later")).unwrap(), b"now");
    m.assert_identical();
}

#[test]
fn requests_go_through_io_uring_when_the_kernel_offers_it() {
    let test = "requests_go_through_io_uring_when_the_kernel_offers_it";
    let on = fs::read_to_string(ENABLE).is_ok_and(|v| v.trim() == "Y");
    if !on {
        let why = format!("{test}: CANNOT RUN: FUSE over io_uring is off ({ENABLE})");
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{why} -- failing because CI=true (.ci/install.sh turns it on)");
        }
        eprintln!("\n!!!!!!!! {why} -- NOT TESTED !!!!!!!!\n");
        return;
    }
    let Some(m) = Mounted::new(test, "") else {
        return;
    };
    let (_, st) = status_json(&m.mnt);
    assert_eq!(st["transport"], "io_uring", "{st}");
    // The ring threads serve: they exist, one set per CPU, and they, not
    // fuser's /dev/fuse threads, take the CPU time of the work.
    let pid = m.daemon_pid().expect("daemon pid");
    let cpu_of = |prefix: &str| -> u64 {
        let mut total = 0;
        for t in fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
            let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.starts_with(prefix) {
                let stat = fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                let after = stat.rsplit(')').next().unwrap_or("");
                let f: Vec<&str> = after.split_whitespace().collect();
                total += f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
            }
        }
        total
    };
    let rings = fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter(|t| fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("ring-")))
        .count();
    assert!(rings >= 2, "{rings} ring threads");
    exercise(&m);
    for i in 0..2000 {
        let _ = fs::metadata(m.path(&format!("d/e/file-with-a-long-name-{:04}", 1 + i % 299)));
        fs::write(m.path("d/small"), i.to_string()).unwrap();
    }
    let (ring, fuser) = (cpu_of("ring-"), cpu_of("fuser-"));
    assert!(
        ring > 0 && fuser * 10 <= ring,
        "CPU ticks: ring threads {ring}, /dev/fuse threads {fuser}"
    );
    m.finish();
}

#[test]
fn the_dev_fuse_transport_serves_everything_when_io_uring_is_off() {
    let test = "the_dev_fuse_transport_serves_everything_when_io_uring_is_off";
    let Some(m) = Mounted::with_env(test, "", None, vec![("MIRRORFS_URING", "0")]) else {
        return;
    };
    let (_, st) = status_json(&m.mnt);
    assert_eq!(st["transport"], "/dev/fuse", "{st}");
    exercise(&m);
    m.finish();
}

/// The first requests of a mount wait in the kernel until the ring is up,
/// and one of them may be put in an entry the moment it is registered: it
/// must be answered, not lost (an early version dropped that completion,
/// and the request hung for good). Each round mounts and at once lists
/// the mount from another process, with a time limit.
#[test]
fn the_first_request_of_each_mount_is_answered() {
    for round in 0..20 {
        let Some(m) = Mounted::new("the_first_request_of_each_mount_is_answered", "") else {
            return;
        };
        let out = crate::common::run_within(Command::new("ls").arg("-la").arg(&m.mnt), Duration::from_secs(10));
        assert!(out.status.success(), "round {round}: ls of a fresh mount failed");
        m.finish();
    }
}
