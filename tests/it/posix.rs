//! The POSIX surface through the mount; each test ends with identical sides.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use crate::common::{Mounted, ok, run};

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn errno_of(ret: libc::c_int) -> i32 {
    if ret == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap()
    }
}

#[test]
fn files_and_directories() {
    let Some(m) = Mounted::new("files_and_directories", "") else {
        return;
    };
    fs::create_dir_all(m.path("a/b/c")).unwrap();
    fs::write(m.path("a/b/c/f"), b"hello").unwrap();
    let mut f = OpenOptions::new().append(true).open(m.path("a/b/c/f")).unwrap();
    f.write_all(b" world").unwrap();
    drop(f);
    assert_eq!(fs::read(m.path("a/b/c/f")).unwrap(), b"hello world");
    // A 1 MiB write in one call, read back.
    let big: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    fs::write(m.path("big"), &big).unwrap();
    assert_eq!(fs::read(m.path("big")).unwrap(), big);
    // truncate by path and by handle
    let f = OpenOptions::new().write(true).open(m.path("big")).unwrap();
    f.set_len(1000).unwrap();
    drop(f);
    assert_eq!(fs::metadata(m.path("big")).unwrap().len(), 1000);
    let cp = c(&m.path("big"));
    assert_eq!(unsafe { libc::truncate(cp.as_ptr(), 10) }, 0);
    assert_eq!(fs::metadata(m.path("big")).unwrap().len(), 10);
    assert_eq!(
        fs::remove_dir(m.path("a")).unwrap_err().raw_os_error(),
        Some(libc::ENOTEMPTY)
    );
    fs::remove_file(m.path("a/b/c/f")).unwrap();
    fs::remove_dir(m.path("a/b/c")).unwrap();
    assert_eq!(
        fs::remove_file(m.path("nope")).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
    let mut names: Vec<_> = fs::read_dir(&m.mnt).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, vec!["a", "big"]);
    m.finish();
}

#[test]
fn renames_with_flags() {
    let Some(m) = Mounted::new("renames_with_flags", "") else {
        return;
    };
    fs::write(m.path("x"), b"x").unwrap();
    fs::write(m.path("y"), b"y").unwrap();
    let (x, y) = (c(&m.path("x")), c(&m.path("y")));
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            x.as_ptr(),
            libc::AT_FDCWD,
            y.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    assert_eq!(errno_of(r), libc::EEXIST);
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            x.as_ptr(),
            libc::AT_FDCWD,
            y.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(errno_of(r), 0);
    assert_eq!(fs::read(m.path("x")).unwrap(), b"y");
    assert_eq!(fs::read(m.path("y")).unwrap(), b"x");
    fs::rename(m.path("x"), m.path("y")).unwrap();
    assert_eq!(fs::read(m.path("y")).unwrap(), b"y");
    assert!(!m.path("x").exists());
    // A directory renamed while a file under it is open.
    fs::create_dir(m.path("d")).unwrap();
    let mut f = File::create(m.path("d/open")).unwrap();
    f.write_all(b"before ").unwrap();
    fs::rename(m.path("d"), m.path("e")).unwrap();
    f.write_all(b"after").unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(fs::read(m.path("e/open")).unwrap(), b"before after");
    fs::write(m.path("e/new"), b"n").unwrap();
    m.finish();
}

#[test]
fn links_symlinks_and_special_files() {
    let Some(m) = Mounted::new("links_symlinks_and_special_files", "") else {
        return;
    };
    fs::write(m.path("f"), b"data").unwrap();
    fs::hard_link(m.path("f"), m.path("g")).unwrap();
    let (a, b) = (fs::metadata(m.path("f")).unwrap(), fs::metadata(m.path("g")).unwrap());
    assert_eq!(a.ino(), b.ino(), "hard links show one inode");
    assert_eq!(b.nlink(), 2);
    std::os::unix::fs::symlink("f", m.path("l")).unwrap();
    assert_eq!(fs::read_link(m.path("l")).unwrap(), Path::new("f"));
    assert_eq!(fs::read(m.path("l")).unwrap(), b"data");
    fs::remove_file(m.path("f")).unwrap();
    assert_eq!(fs::metadata(m.path("g")).unwrap().nlink(), 1);
    assert_eq!(fs::read(m.path("g")).unwrap(), b"data");
    let fifo = c(&m.path("fifo"));
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    let sock = c(&m.path("sock"));
    assert_eq!(unsafe { libc::mknod(sock.as_ptr(), libc::S_IFSOCK | 0o600, 0) }, 0);
    assert!(fs::symlink_metadata(m.path("fifo")).unwrap().file_type().is_fifo());
    assert!(fs::symlink_metadata(m.path("sock")).unwrap().file_type().is_socket());
    for side in [&m.primary, &m.mirror] {
        assert!(fs::symlink_metadata(side.join("fifo")).unwrap().file_type().is_fifo());
        assert_eq!(fs::metadata(side.join("fifo")).unwrap().mode() & 0o777, 0o640);
    }
    m.finish();
}

#[test]
fn attributes_and_explicit_times_are_identical_on_both_sides() {
    let Some(m) = Mounted::new("attributes_and_explicit_times_are_identical_on_both_sides", "") else {
        return;
    };
    fs::write(m.path("f"), b"x").unwrap();
    fs::set_permissions(m.path("f"), fs::Permissions::from_mode(0o4751)).unwrap();
    std::os::unix::fs::lchown(m.path("f"), Some(1234), Some(5678)).unwrap();
    // chown clears set-ID bits, as on any Linux filesystem.
    assert_eq!(fs::metadata(m.path("f")).unwrap().mode() & 0o7777, 0o751);
    fs::set_permissions(m.path("f"), fs::Permissions::from_mode(0o2640)).unwrap();
    let ts = [
        libc::timespec {
            tv_sec: 1_000_000_000,
            tv_nsec: 123_456_789,
        },
        libc::timespec {
            tv_sec: 1_500_000_000,
            tv_nsec: 987_654_321,
        },
    ];
    let p = c(&m.path("f"));
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), ts.as_ptr(), 0) },
        0
    );
    let now = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    ];
    fs::write(m.path("g"), b"y").unwrap();
    let g = c(&m.path("g"));
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, g.as_ptr(), now.as_ptr(), 0) },
        0
    );
    let md = fs::metadata(m.path("f")).unwrap();
    assert_eq!((md.mode() & 0o7777, md.uid(), md.gid()), (0o2640, 1234, 5678));
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_500_000_000, 987_654_321));
    for side in [&m.primary, &m.mirror] {
        let s = fs::metadata(side.join("f")).unwrap();
        assert_eq!(
            (s.atime(), s.atime_nsec(), s.mtime(), s.mtime_nsec()),
            (1_000_000_000, 123_456_789, 1_500_000_000, 987_654_321)
        );
    }
    let (pg, mg) = (
        fs::metadata(m.primary.join("g")).unwrap(),
        fs::metadata(m.mirror.join("g")).unwrap(),
    );
    assert_eq!(
        (pg.atime(), pg.atime_nsec()),
        (mg.atime(), mg.atime_nsec()),
        "UTIME_NOW is one instant on both sides"
    );
    m.finish();
}

#[test]
fn xattrs() {
    let Some(m) = Mounted::new("xattrs", "") else { return };
    fs::write(m.path("f"), b"x").unwrap();
    let p = m.path("f");
    ok(Command::new("setfattr").args(["-n", "user.one", "-v", "1"]).arg(&p));
    ok(Command::new("setfattr").args(["-n", "user.two", "-v", "2"]).arg(&p));
    ok(Command::new("setfattr").args(["-x", "user.one"]).arg(&p));
    let out = ok(Command::new("getfattr").args(["-d", "--absolute-names"]).arg(&p));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("user.two=\"2\"") && !text.contains("user.one"), "{text}");
    let missing = run(Command::new("getfattr").args(["-n", "user.one"]).arg(&p));
    assert!(!missing.status.success());
    m.finish();
}

#[test]
fn fallocate_seek_hole_and_copy_file_range() {
    let Some(m) = Mounted::new("fallocate_seek_hole_and_copy_file_range", "") else {
        return;
    };
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path("sparse"))
        .unwrap();
    f.write_all(&[7u8; 4096]).unwrap();
    f.seek(SeekFrom::Start(1 << 20)).unwrap();
    f.write_all(&[9u8; 4096]).unwrap();
    f.sync_all().unwrap();
    let fd = f.as_raw_fd();
    assert_eq!(unsafe { libc::fallocate(fd, 0, 8 << 20, 1 << 20) }, 0);
    assert_eq!(f.metadata().unwrap().len(), 9 << 20);
    assert_eq!(
        unsafe { libc::fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 0, 4096) },
        0
    );
    let data = unsafe { libc::lseek(fd, 0, libc::SEEK_DATA) };
    assert_eq!(data, 1 << 20, "first data after the punched hole");
    let hole = unsafe { libc::lseek(fd, 1 << 20, libc::SEEK_HOLE) };
    assert!(hole > (1 << 20) && hole < 9 << 20, "hole at {hole}");
    let out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path("copy"))
        .unwrap();
    let (mut oi, mut oo) = ((1i64 << 20), 0i64);
    let n = unsafe { libc::copy_file_range(fd, &mut oi, out.as_raw_fd(), &mut oo, 4096, 0) };
    assert_eq!(n, 4096);
    drop(out);
    assert_eq!(fs::read(m.path("copy")).unwrap(), vec![9u8; 4096]);
    drop(f);
    m.finish();
}

#[test]
fn unlinked_open_file_keeps_working() {
    let Some(m) = Mounted::new("unlinked_open_file_keeps_working", "") else {
        return;
    };
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path("tmp"))
        .unwrap();
    f.write_all(b"abc").unwrap();
    fs::remove_file(m.path("tmp")).unwrap();
    f.write_all(b"def").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "abcdef");
    assert_eq!(f.metadata().unwrap().len(), 6);
    f.set_len(2).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert!(!m.path("tmp").exists());
    m.finish();
}

#[test]
fn shared_mmap_writes_reach_both_sides() {
    let Some(m) = Mounted::new("shared_mmap_writes_reach_both_sides", "") else {
        return;
    };
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path("mm"))
        .unwrap();
    f.set_len(8192).unwrap();
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        std::ptr::write_bytes(p as *mut u8, 0x5a, 8192);
        assert_eq!(libc::msync(p, 8192, libc::MS_SYNC), 0);
        libc::munmap(p, 8192);
    }
    drop(f);
    assert_eq!(fs::read(m.mirror.join("mm")).unwrap(), vec![0x5a; 8192]);
    m.finish();
}

#[test]
fn metadata_dir_is_invisible_and_untouchable() {
    let Some(m) = Mounted::new("metadata_dir_is_invisible_and_untouchable", "") else {
        return;
    };
    assert!(m.primary.join(".mirrorfs/identity.json").exists());
    assert_eq!(fs::read_dir(&m.mnt).unwrap().count(), 0, "a fresh mount is empty");
    assert_eq!(
        fs::metadata(m.path(".mirrorfs")).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
    assert!(fs::create_dir(m.path(".mirrorfs")).is_err());
    assert!(fs::write(m.path(".mirrorfs"), b"x").is_err());
    fs::write(m.path("x"), b"x").unwrap();
    assert!(fs::rename(m.path("x"), m.path(".mirrorfs")).is_err());
    assert!(fs::remove_dir(m.path(".mirrorfs")).is_err());
    assert!(fs::remove_file(m.path(".mirrorfs")).is_err());
    assert!(m.primary.join(".mirrorfs/identity.json").exists());
    assert!(m.mirror.join(".mirrorfs/identity.json").exists());
    // Deeper directories may use the name.
    fs::create_dir_all(m.path("sub/.mirrorfs")).unwrap();
    m.finish();
}

fn as_nobody(script: &str) -> std::process::Output {
    run(Command::new("setpriv").args([
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "sh",
        "-c",
        script,
    ]))
}

#[test]
fn allow_other_checks_permissions_and_creates_as_the_caller() {
    let Some(m) = Mounted::new(
        "allow_other_checks_permissions_and_creates_as_the_caller",
        "allow_other",
    ) else {
        return;
    };
    fs::write(m.path("secret"), b"root only").unwrap();
    fs::set_permissions(m.path("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::create_dir(m.path("pub")).unwrap();
    fs::set_permissions(m.path("pub"), fs::Permissions::from_mode(0o777)).unwrap();
    let denied = as_nobody(&format!("cat {}", m.path("secret").display()));
    assert!(!denied.status.success(), "nobody read a root 0600 file");
    assert!(String::from_utf8_lossy(&denied.stderr).contains("Permission denied"));
    let made = as_nobody(&format!(
        "umask 022; echo hi > {0}/f && mkdir {0}/d && ln -s f {0}/l && mkfifo {0}/p",
        m.path("pub").display()
    ));
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let nogroup = nix::unistd::Group::from_name("nogroup").unwrap().unwrap();
    for side in [&m.mnt, &m.primary, &m.mirror] {
        for name in ["f", "d", "l", "p"] {
            let md = fs::symlink_metadata(side.join("pub").join(name)).unwrap();
            assert_eq!(
                (md.uid(), md.gid()),
                (nobody.uid.as_raw(), nogroup.gid.as_raw()),
                "{} in {}",
                name,
                side.display()
            );
        }
        assert_eq!(fs::metadata(side.join("pub/f")).unwrap().mode() & 0o777, 0o644);
    }
    m.finish();
}

/// The file's permission bits through the mount and on each side.
fn modes(m: &Mounted, rel: &str) -> [u32; 3] {
    [&m.mnt, &m.primary, &m.mirror].map(|root| fs::metadata(root.join(rel)).unwrap().mode() & 0o7777)
}

#[test]
fn writes_and_truncates_clear_setid_bits_only_for_callers_without_cap_fsetid() {
    let Some(m) = Mounted::new(
        "writes_and_truncates_clear_setid_bits_only_for_callers_without_cap_fsetid",
        "allow_other",
    ) else {
        return;
    };
    fs::create_dir(m.path("pub")).unwrap();
    fs::set_permissions(m.path("pub"), fs::Permissions::from_mode(0o777)).unwrap();
    let f = "pub/setid";
    let setid = |mode: u32| fs::set_permissions(m.path(f), fs::Permissions::from_mode(mode)).unwrap();
    fs::write(m.path(f), b"start\n").unwrap();

    // root (CAP_FSETID) keeps the bits, on a write and on a truncate.
    setid(0o6777);
    let mut w = OpenOptions::new().append(true).open(m.path(f)).unwrap();
    w.write_all(b"root\n").unwrap();
    w.sync_all().unwrap();
    drop(w);
    assert_eq!(modes(&m, f), [0o6777; 3], "a root write kept the set-ID bits");
    ok(Command::new("truncate").args(["-s", "3"]).arg(m.path(f)));
    assert_eq!(modes(&m, f), [0o6777; 3], "a root truncate kept the set-ID bits");

    // nobody (no CAP_FSETID) may write it, and loses both bits doing so.
    let out = as_nobody(&format!("echo nobody >> {}", m.path(f).display()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        modes(&m, f),
        [0o777; 3],
        "a write by nobody cleared set-user-ID and set-group-ID"
    );
    assert!(fs::read_to_string(m.primary.join(f)).unwrap().ends_with("nobody\n"));

    setid(0o6777);
    let out = as_nobody(&format!("truncate -s 1 {}", m.path(f).display()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(modes(&m, f), [0o777; 3], "a truncate by nobody cleared them");

    // Set-group-ID without group execute is not a privilege: it stays.
    setid(0o4767);
    let out = as_nobody(&format!("echo again >> {}", m.path(f).display()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(modes(&m, f), [0o767; 3]);
    setid(0o2767);
    let out = as_nobody(&format!("echo more >> {}", m.path(f).display()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(modes(&m, f), [0o2767; 3], "set-group-ID without group execute stays");
    m.finish();
}

#[test]
fn statfs_reports_the_backing_space() {
    let Some(m) = Mounted::new("statfs_reports_the_backing_space", "") else {
        return;
    };
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let p = c(&m.mnt);
    assert_eq!(unsafe { libc::statvfs(p.as_ptr(), &mut st) }, 0);
    assert!(st.f_blocks > 0 && st.f_bavail > 0 && st.f_bavail <= st.f_blocks);
    m.finish();
}

/// The mount reads ahead as far as its sides' device does, and at least one
/// full 1 MiB request: not the 128 KiB the kernel starts a FUSE mount with.
#[test]
fn readahead_is_widened_to_the_sides_device() {
    let Some(m) = Mounted::new("readahead_is_widened_to_the_sides_device", "") else {
        return;
    };
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dev = info
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f.get(4) == Some(&m.mnt.to_str().unwrap()))
        .map(|f| f[2].to_string())
        .expect("the mount in mountinfo");
    let kb = |path: &str| -> Option<u64> { fs::read_to_string(path).ok()?.trim().parse().ok() };
    let mine = kb(&format!("/sys/class/bdi/{dev}/read_ahead_kb")).expect("the mount's bdi");
    let side_dev = fs::metadata(&m.primary).unwrap().dev();
    let (major, minor) = (libc::major(side_dev), libc::minor(side_dev));
    let side = kb(&format!("/sys/dev/block/{major}:{minor}/queue/read_ahead_kb"))
        .or_else(|| kb(&format!("/sys/dev/block/{major}:{minor}/../queue/read_ahead_kb")))
        .or_else(|| kb(&format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb")))
        .unwrap_or(0);
    assert_eq!(
        mine,
        side.clamp(1024, 16 << 10),
        "mount {mine} KiB, side's device {side} KiB"
    );
    m.finish();
}
