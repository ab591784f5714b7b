//! A side that fails with a real kernel error is taken out of service; the
//! caller sees no error, and the survivor records the side as stale.

use std::fs::{self, OpenOptions};
use std::io::Write;

use crate::common::Mounted;

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
    let err = m.try_remount("").unwrap_err();
    assert!(err.contains("mirror is stale"), "{err}");
}
