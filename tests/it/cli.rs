//! The command line as a user meets it: refusals, exit codes, background
//! mount, unmount.

use std::process::Command;

use crate::common::{BIN, Mounted, fuse_available, is_mounted, ok, open_tempdir, run, unmount_or_detach};

fn mount_refusal(spec: &str, mnt: &str, opts: &str, cwd: &std::path::Path) -> (i32, String) {
    let mut c = Command::new(BIN);
    c.current_dir(cwd).arg("mount");
    if !opts.is_empty() {
        c.args(["-o", opts]);
    }
    let out = run(c.args([spec, mnt]));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn mount_refuses_bad_specs_with_one_line_and_exit_2() {
    let t = open_tempdir();
    for d in ["a", "b", "m", "a/inner"] {
        std::fs::create_dir_all(t.path().join(d)).unwrap();
    }
    std::fs::write(t.path().join("file"), b"").unwrap();
    let cases = [
        ("a", "m", "no '|'"),
        ("a|b|c", "m", "more than one '|'"),
        ("|b", "m", "primary side is empty"),
        ("a|", "m", "mirror side is empty"),
        ("a|./a", "m", "same directory"),
        ("a|a/inner", "m", "inside primary"),
        ("a|b", "a/inner", "inside the primary"),
        ("a|file", "m", "not a directory"),
        ("a|missing", "m", "use -o mirror_skip"),
    ];
    for (spec, mnt, want) in cases {
        let (code, err) = mount_refusal(spec, mnt, "", t.path());
        assert_eq!(code, 2, "{spec} {mnt}: {err}");
        assert!(err.contains(want), "{spec} {mnt}: expected '{want}' in {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    }
    let (code, err) = mount_refusal("a|b", "m", "bogus", t.path());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown mount option"), "{err}");
}

#[test]
fn mount_refuses_a_hook_that_is_not_a_program() {
    use std::os::unix::fs::PermissionsExt;
    let t = open_tempdir();
    for d in ["a", "b", "m"] {
        std::fs::create_dir_all(t.path().join(d)).unwrap();
    }
    let plain = t.path().join("plain");
    std::fs::write(&plain, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
    for (hook, want) in [
        ("./missing", "does not exist"),
        ("no-such-hook-program", "no such program in PATH"),
        ("./plain", "not executable"),
        ("./a", "not a regular file"),
    ] {
        let (code, err) = mount_refusal("a|b", "m", &format!("hook={hook}"), t.path());
        assert_eq!(code, 2, "hook={hook}: {err}");
        assert!(err.contains(want), "hook={hook}: expected '{want}' in {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    }
    assert!(!is_mounted(&t.path().join("m")));
}

#[test]
fn help_documents_exit_codes() {
    let out = ok(Command::new(BIN).arg("--help"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Exit codes") && text.contains("usage error"), "{text}");
}

#[test]
fn background_mount_is_live_when_the_command_returns() {
    if !fuse_available("background_mount_is_live_when_the_command_returns") {
        return;
    }
    let t = open_tempdir();
    let mnt = t.path().join("demo/mnt");
    let spec = format!(
        "{}|{}",
        t.path().join("demo/p").display(),
        t.path().join("demo/m").display()
    );
    ok(Command::new(BIN).args(["mount", "-o", "create", &spec]).arg(&mnt));
    // No waiting: the mount must already answer.
    let live = is_mounted(&mnt);
    let wrote = std::fs::write(mnt.join("hello"), b"world");
    let unmounted = unmount_or_detach(&mnt);
    assert!(live, "not mounted when mount returned");
    wrote.expect("write through a fresh background mount");
    assert!(
        unmounted.status.success(),
        "unmount: {}",
        String::from_utf8_lossy(&unmounted.stderr)
    );
    assert!(!is_mounted(&mnt));
    assert_eq!(std::fs::read(t.path().join("demo/p/hello")).unwrap(), b"world");
    assert_eq!(std::fs::read(t.path().join("demo/m/hello")).unwrap(), b"world");
}

#[test]
fn sigterm_unmounts_cleanly() {
    let Some(mut m) = Mounted::new("sigterm_unmounts_cleanly", "") else {
        return;
    };
    std::fs::write(m.path("f"), b"x").unwrap();
    let pid = m.daemon_pid().expect("daemon pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while is_mounted(&m.mnt) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(!is_mounted(&m.mnt), "still mounted 10 s after SIGTERM");
    m.unmount();
    m.finish();
}

#[test]
fn a_side_cannot_be_mounted_twice() {
    let Some(m) = Mounted::new("a_side_cannot_be_mounted_twice", "") else {
        return;
    };
    let other = m.dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let spec = format!("{}|{}", m.primary.display(), m.dir.path().join("m2").display());
    let out = run(Command::new(BIN).args(["mount", "-o", "create", &spec]).arg(&other));
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already in use"));
    m.finish();
}

#[test]
fn mount_helper_name_takes_fstab_arguments() {
    if !fuse_available("mount_helper_name_takes_fstab_arguments") {
        return;
    }
    let t = open_tempdir();
    let helper = t.path().join("mount.fuse.mirrorfs");
    std::os::unix::fs::symlink(BIN, &helper).unwrap();
    let spec = format!("{}|{}", t.path().join("p").display(), t.path().join("m").display());
    let mnt = t.path().join("mnt");
    ok(Command::new(&helper)
        .arg(&spec)
        .arg(&mnt)
        .args(["-o", "rw,create,nofail"]));
    let live = is_mounted(&mnt);
    unmount_or_detach(&mnt);
    assert!(live);
}

/// Where only `mirrorfs` is installed, mount(8) falls back to fuse3's
/// `mount.fuse3`, which runs `mirrorfs SPEC MOUNTPOINT -o OPTS` from PATH.
#[test]
fn mount_fuse3_runs_the_spec_mountpoint_form() {
    if !fuse_available("mount_fuse3_runs_the_spec_mountpoint_form") {
        return;
    }
    let helper = ["/sbin/mount.fuse3", "/usr/sbin/mount.fuse3"]
        .into_iter()
        .find(|h| std::path::Path::new(h).exists())
        .expect("fuse3's mount.fuse3 (apt install fuse3)");
    let t = open_tempdir();
    let spec = format!("{}|{}", t.path().join("p").display(), t.path().join("m").display());
    let mnt = t.path().join("mnt");
    let bin_dir = std::path::Path::new(BIN).parent().unwrap();
    let path = format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin_dir.display());
    let mount = |opts: &str| {
        run(Command::new(helper)
            .arg(&spec)
            .arg(&mnt)
            .args(["-t", "fuse.mirrorfs", "-o", opts])
            .env("PATH", &path))
    };
    let out = mount("create,nofail,side_timeout=5");
    let live = is_mounted(&mnt);
    let status = run(Command::new(BIN).arg("status").arg(&mnt));
    unmount_or_detach(&mnt);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(live, "not mounted after mount.fuse3 returned");
    assert_eq!(
        status.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );

    let out = mount("create,bogus=1");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && !is_mounted(&mnt),
        "an unknown option was accepted"
    );
    assert!(err.contains("unknown mount option 'bogus=1'"), "{err}");
}

#[test]
fn read_only_mount_serves_one_side_and_refuses_writes() {
    let Some(mut m) = Mounted::new("read_only_mount_serves_one_side_and_refuses_writes", "") else {
        return;
    };
    std::fs::write(m.path("kept"), b"data").unwrap();
    m.unmount();
    m.assert_identical();
    // The mirror is gone: a read-only mount needs no option for that.
    std::fs::rename(&m.mirror, m.dir.path().join("mirror.away")).unwrap();
    m.try_remount("ro").expect("read-only mount with the mirror missing");
    let read = std::fs::read(m.path("kept"));
    let write = std::fs::write(m.path("new"), b"x");
    m.unmount();
    assert_eq!(read.unwrap(), b"data");
    assert_eq!(write.unwrap_err().raw_os_error(), Some(libc::EROFS));
    assert!(!m.primary.join("new").exists());
}
