//! The `.mirrorfs/` metadata directory at the root of each side.
//!
//! Owns: the side's identity file and the lock that keeps two daemons off
//! one side. The identity ties the two sides of a pair together: sides with
//! different pair ids are never mounted as one pair. Knows nothing of FUSE.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::runtime::{EXIT_WAIT, Liveness, holders_of, liveness};
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
    write_durably_mode(path, data, 0o644)
}

/// `write_durably`, the file made with `mode`.
pub fn write_durably_mode(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
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

/// A side's `state.json`: its generation, raised each time its peer goes
/// out of service, and the record of the peer's outage while it lasts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideRecord {
    #[serde(default)]
    pub generation: u64,
    #[serde(default)]
    pub peer_stale: Option<PeerStale>,
}

pub fn read_record(side_root: &Path) -> io::Result<SideRecord> {
    Ok(read_json(side_root, STATE)?.unwrap_or_default())
}

fn write_record(side_root: &Path, rec: &SideRecord) -> io::Result<()> {
    let json = serde_json::to_vec_pretty(rec).map_err(io::Error::other)?;
    write_durably(&meta_dir(side_root).join(STATE), &json)
}

/// Records durably, on the surviving side, that `stale` missed changes, and
/// raises the survivor's generation. An outage already recorded is kept:
/// the side has missed changes since the first.
pub fn record_stale(survivor_root: &Path, stale: Side, op: &str, errno: &str) -> io::Result<()> {
    let mut rec = read_record(survivor_root)?;
    if rec.peer_stale.is_some() {
        return Ok(());
    }
    rec.generation += 1;
    rec.peer_stale = Some(PeerStale {
        stale: stale.name().to_string(),
        since: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        op: op.to_string(),
        errno: errno.to_string(),
    });
    write_record(survivor_root, &rec)
}

/// Forgets the peer's outage once the peer has been caught up.
pub fn clear_stale(side_root: &Path) -> io::Result<()> {
    let mut rec = read_record(side_root)?;
    if rec.peer_stale.is_none() {
        return Ok(());
    }
    rec.peer_stale = None;
    write_record(side_root, &rec)
}

pub fn read_stale(side_root: &Path) -> io::Result<Option<PeerStale>> {
    Ok(read_record(side_root)?.peer_stale)
}

/// The missed-change journal of a side: the paths it changed that its peer lacks.
pub fn journal_path(side_root: &Path) -> PathBuf {
    meta_dir(side_root).join(crate::journal::JOURNAL)
}

/// Whether one side must be caught up from the other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Staleness {
    /// Neither side records the other as stale.
    Current,
    /// This side missed changes; the record is its peer's.
    Stale(Side, PeerStale),
    /// Both sides took changes the other lacks.
    Split,
}

/// Which side must not be served, from the sides' records. When both
/// record the other as stale, a side whose journal is empty took no change
/// while the other was away: it is merely stale. Otherwise it is a split.
pub fn staleness(roots: [Option<&Path>; 2]) -> Result<Staleness, String> {
    let mut found = Vec::new();
    for side in Side::BOTH {
        let Some(root) = roots[side.index()] else { continue };
        if let Some(rec) = read_stale(root).map_err(|e| format!("{side} {}: {e}", root.display()))? {
            let stale: Side = rec.stale.parse()?;
            found.push((stale, rec));
        }
    }
    if found.len() < 2 {
        return Ok(found.pop().map_or(Staleness::Current, |(s, r)| Staleness::Stale(s, r)));
    }
    let took_changes = |side: Side| {
        roots[side.index()]
            .map(|r| {
                crate::journal::read_paths(&journal_path(r))
                    .map(|p| !p.is_empty())
                    .unwrap_or(true)
            })
            .unwrap_or(true)
    };
    match (took_changes(Side::Primary), took_changes(Side::Mirror)) {
        (true, true) => Ok(Staleness::Split),
        (false, _) => Ok(found
            .into_iter()
            .find(|(s, _)| *s == Side::Primary)
            .map_or(Staleness::Split, |(s, r)| Staleness::Stale(s, r))),
        (true, false) => Ok(found
            .into_iter()
            .find(|(s, _)| *s == Side::Mirror)
            .map_or(Staleness::Split, |(s, r)| Staleness::Stale(s, r))),
    }
}

/// An exclusive lock on a side, held for the daemon's life.
#[derive(Debug)]
pub struct SideLock {
    _file: File,
}

impl SideLock {
    /// Lets another daemon take the side, without closing the file (a
    /// close on a hung FUSE or network side would wait for it; an unlock
    /// never does).
    pub fn unlock(&self) {
        // SAFETY: valid fd.
        unsafe { libc::flock(self._file.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Takes the side's lock. A lock held by a running process is refused at
/// once; one held by a daemon that is exiting (just killed, its threads
/// still finishing) is waited for, up to `EXIT_WAIT`, so that a restart
/// right after a crash succeeds.
pub fn lock_side(side: Side, root: &Path) -> Result<SideLock, String> {
    let path = meta_dir(root).join(LOCK);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("{side} {}: cannot open {}: {e}", root.display(), path.display()))?;
    let me = std::process::id() as i32;
    let mut deadline = None;
    loop {
        // SAFETY: valid fd.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(SideLock { _file: file });
        }
        // One fd per holder's open; ours is among them.
        let (mine, mut others): (Vec<i32>, Vec<i32>) = holders_of(&path).into_iter().partition(|&p| p == me);
        others.dedup();
        let running = if mine.len() > 1 {
            Some(me)
        } else {
            others.iter().copied().find(|&p| liveness(p) == Liveness::Running)
        };
        if let Some(pid) = running {
            return Err(format!(
                "{side} {} is already in use by another mirrorfs mount (pid {pid})",
                root.display()
            ));
        }
        let who = match others.as_slice() {
            [] => "a process that is exiting, or one this user cannot see".to_string(),
            pids => format!("pid {}, which is exiting", join(pids)),
        };
        let deadline = *deadline.get_or_insert_with(|| {
            log::warn!(
                "side={side} path={}: its lock is held by {who}: waiting up to {} s for it",
                root.display(),
                EXIT_WAIT.as_secs()
            );
            Instant::now() + EXIT_WAIT
        });
        if Instant::now() >= deadline {
            return Err(format!(
                "{side} {} is still locked by {who}, {} s on",
                root.display(),
                EXIT_WAIT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn join(pids: &[i32]) -> String {
    pids.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
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
        let roots = [Some(a.as_path()), Some(b.as_path())];
        assert_eq!(staleness(roots).unwrap(), Staleness::Current);
        record_stale(&a, Side::Mirror, "write", "EIO").unwrap();
        record_stale(&a, Side::Mirror, "fsync", "ENOSPC").unwrap();
        let Staleness::Stale(side, rec) = staleness(roots).unwrap() else {
            panic!("not stale")
        };
        assert_eq!(
            (side, rec.op.as_str(), rec.errno.as_str()),
            (Side::Mirror, "write", "EIO"),
            "the first outage is kept"
        );
        assert_eq!(read_record(&a).unwrap().generation, 1);
        // The mirror, mounted alone, records the primary stale too: with no
        // change journaled on the mirror, the mirror is merely stale.
        crate::journal::PathLog::open(journal_path(&a))
            .unwrap()
            .record(&[Path::new("x")])
            .unwrap();
        record_stale(&b, Side::Primary, "mount", "ENOENT").unwrap();
        assert!(matches!(staleness(roots).unwrap(), Staleness::Stale(Side::Mirror, _)));
        crate::journal::PathLog::open(journal_path(&b))
            .unwrap()
            .record(&[Path::new("y")])
            .unwrap();
        assert_eq!(staleness(roots).unwrap(), Staleness::Split);
        clear_stale(&a).unwrap();
        assert!(matches!(staleness(roots).unwrap(), Staleness::Stale(Side::Primary, _)));
        assert_eq!(read_record(&a).unwrap().generation, 1);
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
