//! `mirrorfs verify`, offline on two plain directories and online through a
//! running mount.

use std::fs;
use std::process::Command;

use crate::common::{BIN, Mounted, run};

fn verify(args: &[&str]) -> (i32, String) {
    let out = run(Command::new(BIN).arg("verify").args(args));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn verify_finds_every_difference_offline_and_none_online() {
    let Some(mut m) = Mounted::new("verify_finds_every_difference_offline_and_none_online", "") else {
        return;
    };
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("d/a"), vec![7u8; 300_000]).unwrap();
    fs::write(m.path("b"), b"same").unwrap();
    std::os::unix::fs::symlink("d/a", m.path("l")).unwrap();
    let mnt = m.mnt.to_str().unwrap().to_string();
    let (code, text) = verify(&[&mnt]);
    assert_eq!(code, 0, "online verify of a healthy mount:\n{text}");
    assert!(text.contains("0 difference"), "{text}");
    m.unmount();

    let spec = format!("{}|{}", m.primary.display(), m.mirror.display());
    let (code, text) = verify(&[&spec]);
    assert_eq!(code, 0, "offline verify of identical sides:\n{text}");
    // One byte changed in the middle of a large file, a mode, an extra file.
    let mut data = vec![7u8; 300_000];
    data[150_000] = 8;
    fs::write(m.mirror.join("d/a"), &data).unwrap();
    fs::set_permissions(m.mirror.join("b"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    fs::write(m.mirror.join("extra"), b"x").unwrap();
    let (code, text) = verify(&["--json", &spec]);
    assert_eq!(code, 1, "offline verify of differing sides:\n{text}");
    let report: serde_json::Value = serde_json::from_str(&text).expect("one JSON object");
    let paths: Vec<&str> = report["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["path"].as_str().unwrap())
        .collect();
    for p in ["/d/a", "/b", "/extra"] {
        assert!(paths.contains(&p), "{p} not reported: {report:#}");
    }
    assert_eq!(paths.len(), 3, "{report:#}");
}

#[test]
fn verify_refuses_a_degraded_mount_and_a_plain_directory() {
    let Some(m) = Mounted::new("verify_refuses_a_degraded_mount_and_a_plain_directory", "") else {
        return;
    };
    let mnt = m.mnt.to_str().unwrap().to_string();
    let out = run(Command::new(BIN).args(["fail", &mnt, "mirror"]));
    assert!(out.status.success());
    let (code, text) = verify(&[&mnt]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("mirror") && text.contains("DOWN"), "{text}");
    let (code, text) = verify(&[m.dir.path().to_str().unwrap()]);
    assert_eq!(code, 3, "not a mirrorfs mount:\n{text}");
}
