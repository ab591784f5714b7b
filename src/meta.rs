//! The `.mirrorfs/` metadata directory at the root of each side.
//!
//! Owns: the side's identity file and the lock that keeps two daemons off
//! one side. The identity ties the two sides of a pair together: sides with
//! different pair ids are never mounted as one pair. Knows nothing of FUSE.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::spec::Side;
use crate::volume::META_DIR;

pub const IDENTITY: &str = "identity.json";
pub const LOCK: &str = "lock";

/// Who a side is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Shared by both sides of one pair.
    pub pair_id: String,
    /// This side's own id.
    pub side_id: String,
    /// The role this side was created for.
    pub role: String,
    /// Seconds since the epoch when the side joined the pair.
    pub created: u64,
}

pub fn meta_dir(side_root: &Path) -> PathBuf {
    side_root.join(META_DIR)
}

/// A random 128-bit id in hex, from the kernel's random source.
pub fn random_id() -> io::Result<String> {
    let mut b = [0u8; 16];
    File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Reads `.mirrorfs/<name>` as JSON; a missing file is `None`.
fn read_json<T: serde::de::DeserializeOwned>(side_root: &Path, name: &str) -> io::Result<Option<T>> {
    match fs::read(meta_dir(side_root).join(name)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{META_DIR}/{name}: {e}"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn read_identity(side_root: &Path) -> io::Result<Option<Identity>> {
    read_json(side_root, IDENTITY)
}

/// Writes a file durably: temp file, fsync, rename, fsync of the directory.
pub fn write_durably(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Makes sure both sides carry the same pair identity, creating what is
/// missing. Refuses two sides that belong to different pairs.
pub fn ensure_identities(roots: [Option<&Path>; 2]) -> Result<[Option<Identity>; 2], String> {
    let mut ids: [Option<Identity>; 2] = [None, None];
    for side in Side::BOTH {
        if let Some(root) = roots[side.index()] {
            ids[side.index()] = read_identity(root).map_err(|e| format!("{side} {}: {e}", root.display()))?;
        }
    }
    if let (Some(p), Some(m)) = (&ids[0], &ids[1])
        && p.pair_id != m.pair_id
    {
        return Err(format!(
            "primary and mirror belong to different pairs ({} and {}): refusing to mount them together",
            p.pair_id, m.pair_id
        ));
    }
    let pair_id = match ids.iter().flatten().next() {
        Some(id) => id.pair_id.clone(),
        None => random_id().map_err(|e| format!("cannot make a pair id: {e}"))?,
    };
    for side in Side::BOTH {
        let Some(root) = roots[side.index()] else { continue };
        if ids[side.index()].is_some() {
            continue;
        }
        let id = Identity {
            pair_id: pair_id.clone(),
            side_id: random_id().map_err(|e| format!("cannot make a side id: {e}"))?,
            role: side.name().to_string(),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let dir = meta_dir(root);
        let write = || -> io::Result<()> {
            fs::create_dir_all(&dir)?;
            fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
            let json = serde_json::to_vec_pretty(&id).map_err(io::Error::other)?;
            write_durably(&dir.join(IDENTITY), &json)
        };
        write().map_err(|e| format!("{side} {}: cannot write {META_DIR}/{IDENTITY}: {e}", root.display()))?;
        ids[side.index()] = Some(id);
    }
    Ok(ids)
}

pub const STATE: &str = "state.json";

/// What a side records about its peer: the peer was taken out of service
/// and has missed changes since `since`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStale {
    pub stale: String,
    pub since: u64,
    pub op: String,
    pub errno: String,
}

/// Records durably, on the surviving side, that `stale` missed changes.
pub fn record_stale(survivor_root: &Path, stale: Side, op: &str, errno: &str) -> io::Result<()> {
    let rec = PeerStale {
        stale: stale.name().to_string(),
        since: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        op: op.to_string(),
        errno: errno.to_string(),
    };
    let json = serde_json::to_vec_pretty(&rec).map_err(io::Error::other)?;
    write_durably(&meta_dir(survivor_root).join(STATE), &json)
}

pub fn read_stale(side_root: &Path) -> io::Result<Option<PeerStale>> {
    read_json(side_root, STATE)
}

/// The side that must not be served because its peer recorded it stale.
/// Both sides recording each other stale is a split: refused.
pub fn stale_side(roots: [Option<&Path>; 2]) -> Result<Option<(Side, PeerStale)>, String> {
    let mut found = Vec::new();
    for side in Side::BOTH {
        let Some(root) = roots[side.index()] else { continue };
        if let Some(rec) = read_stale(root).map_err(|e| format!("{side} {}: {e}", root.display()))? {
            let stale: Side = rec.stale.parse()?;
            found.push((stale, rec));
        }
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err("both sides record the other as stale (split brain): resolve by hand, see README \"Recovery\"".into()),
    }
}

/// An exclusive lock on a side, held for the daemon's life.
#[derive(Debug)]
pub struct SideLock {
    _file: File,
}

pub fn lock_side(side: Side, root: &Path) -> Result<SideLock, String> {
    let path = meta_dir(root).join(LOCK);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("{side} {}: cannot open {}: {e}", root.display(), path.display()))?;
    // SAFETY: valid fd.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(format!(
            "{side} {} is already in use by another mirrorfs mount",
            root.display()
        ));
    }
    Ok(SideLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gives_both_sides_one_pair_id_and_keeps_it() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        let ids = ensure_identities([Some(&a), Some(&b)]).unwrap();
        let (p, m) = (ids[0].clone().unwrap(), ids[1].clone().unwrap());
        assert_eq!(p.pair_id, m.pair_id);
        assert_ne!(p.side_id, m.side_id);
        assert_eq!((p.role.as_str(), m.role.as_str()), ("primary", "mirror"));
        let again = ensure_identities([Some(&a), Some(&b)]).unwrap();
        assert_eq!(again[0].as_ref().unwrap(), &p);
    }

    #[test]
    fn refuses_sides_of_different_pairs() {
        let t = tempfile::tempdir().unwrap();
        let (a, b, c) = (t.path().join("a"), t.path().join("b"), t.path().join("c"));
        for d in [&a, &b, &c] {
            fs::create_dir_all(d).unwrap();
        }
        ensure_identities([Some(&a), Some(&b)]).unwrap();
        ensure_identities([Some(&c), None]).unwrap();
        let err = ensure_identities([Some(&a), Some(&c)]).unwrap_err();
        assert!(err.contains("different pairs"), "{err}");
    }

    #[test]
    fn records_and_reads_a_stale_peer() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        for d in [&a, &b] {
            fs::create_dir_all(d).unwrap();
        }
        ensure_identities([Some(&a), Some(&b)]).unwrap();
        assert_eq!(stale_side([Some(&a), Some(&b)]).unwrap(), None);
        record_stale(&a, Side::Mirror, "write", "EIO").unwrap();
        let (side, rec) = stale_side([Some(&a), Some(&b)]).unwrap().unwrap();
        assert_eq!(
            (side, rec.op.as_str(), rec.errno.as_str()),
            (Side::Mirror, "write", "EIO")
        );
        record_stale(&b, Side::Primary, "write", "EIO").unwrap();
        assert!(stale_side([Some(&a), Some(&b)]).unwrap_err().contains("split"));
    }

    #[test]
    fn a_side_can_be_locked_once() {
        let t = tempfile::tempdir().unwrap();
        ensure_identities([Some(t.path()), None]).unwrap();
        let _l = lock_side(Side::Primary, t.path()).unwrap();
        let err = lock_side(Side::Primary, t.path()).unwrap_err();
        assert!(err.contains("already in use"), "{err}");
    }
}
