//! Compares two directory trees entry by entry: type, mode, owner, size,
//! symlink target, xattrs, xxh3 content hash, and which paths are hard links
//! of each other. The metadata directory at the root is left out.
//!
//! Owns: the comparison (used by tests) and `mirrorfs verify`. Online it
//! asks the daemon only for the two sides' paths and states; it then reads
//! both trees itself, in parallel.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use walkdir::WalkDir;
use xxhash_rust::xxh3::Xxh3;

use crate::volume::META_DIR;

/// What is recorded of one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub rdev: u64,
    pub link_target: Option<Vec<u8>>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub hash: Option<u64>,
    /// For a file with more than one link: the first path (in walk order)
    /// that names the same inode.
    pub link_leader: Option<PathBuf>,
}

/// One difference between the two trees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Difference {
    pub path: PathBuf,
    pub what: String,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.what)
    }
}

fn kind_of(ft: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "directory"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_file() {
        "file"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "char device"
    } else {
        "block device"
    }
}

/// The xattrs of `path` itself (a symlink is not followed).
pub fn xattrs(path: &Path) -> io::Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut out = BTreeMap::new();
    // SAFETY: a null buffer of size 0 asks for the size.
    let n = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOTSUP) {
            Ok(out)
        } else {
            Err(e)
        };
    }
    let mut names = vec![0u8; n as usize];
    // SAFETY: names is valid for its length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    names.truncate(n as usize);
    for name in names.split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let cn = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: as above.
        let len = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), std::ptr::null_mut(), 0) };
        if len < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut val = vec![0u8; len as usize];
        // SAFETY: val is valid for its length.
        let len = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), val.as_mut_ptr().cast(), val.len()) };
        if len < 0 {
            return Err(io::Error::last_os_error());
        }
        val.truncate(len as usize);
        out.insert(name.to_vec(), val);
    }
    Ok(out)
}

/// The xxh3 hash of a file's content.
pub fn hash_file(path: &Path) -> io::Result<u64> {
    let mut f = File::open(path)?;
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.digest());
        }
        h.update(&buf[..n]);
    }
}

/// Records every entry of the tree at `root`, keyed by relative path.
pub fn scan(root: &Path) -> io::Result<BTreeMap<PathBuf, Entry>> {
    let mut out = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let walk = WalkDir::new(root)
        .follow_links(false)
        .sort_by_file_name()
        .min_depth(1)
        .into_iter()
        .filter_entry(|e| !(e.depth() == 1 && e.file_name().as_bytes() == META_DIR.as_bytes()));
    for ent in walk {
        let ent = ent.map_err(|e| e.into_io_error().unwrap_or_else(|| io::Error::other("walk failed")))?;
        let rel = ent.path().strip_prefix(root).map_err(io::Error::other)?.to_path_buf();
        let md = ent.path().symlink_metadata()?;
        let ft = md.file_type();
        let kind = kind_of(&ft);
        let link_target = if ft.is_symlink() {
            Some(std::fs::read_link(ent.path())?.as_os_str().as_bytes().to_vec())
        } else {
            None
        };
        let hash = if ft.is_file() {
            Some(hash_file(ent.path())?)
        } else {
            None
        };
        let link_leader = if !ft.is_dir() && md.nlink() > 1 {
            Some(
                inodes
                    .entry((md.dev(), md.ino()))
                    .or_insert_with(|| rel.clone())
                    .clone(),
            )
        } else {
            None
        };
        out.insert(
            rel,
            Entry {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                size: if ft.is_dir() { 0 } else { md.size() },
                rdev: md.rdev(),
                link_target,
                xattrs: xattrs(ent.path())?,
                hash,
                link_leader,
            },
        );
    }
    Ok(out)
}

/// Every difference between the trees at `a` and `b`.
pub fn compare_trees(a: &Path, b: &Path) -> io::Result<Vec<Difference>> {
    let (ta, tb) = std::thread::scope(|s| {
        let ha = s.spawn(|| scan(a));
        let tb = scan(b);
        (ha.join().unwrap_or_else(|_| Err(io::Error::other("scan panicked"))), tb)
    });
    let (ta, tb) = (ta?, tb?);
    let mut diffs = Vec::new();
    for (path, ea) in &ta {
        let Some(eb) = tb.get(path) else {
            diffs.push(Difference {
                path: path.clone(),
                what: "only on the first side".into(),
            });
            continue;
        };
        let mut what = Vec::new();
        if ea.kind != eb.kind {
            what.push(format!("type {} vs {}", ea.kind, eb.kind));
        }
        if ea.mode != eb.mode {
            what.push(format!("mode {:o} vs {:o}", ea.mode, eb.mode));
        }
        if (ea.uid, ea.gid) != (eb.uid, eb.gid) {
            what.push(format!("owner {}:{} vs {}:{}", ea.uid, ea.gid, eb.uid, eb.gid));
        }
        if ea.size != eb.size {
            what.push(format!("size {} vs {}", ea.size, eb.size));
        }
        if ea.rdev != eb.rdev {
            what.push(format!("rdev {} vs {}", ea.rdev, eb.rdev));
        }
        if ea.link_target != eb.link_target {
            what.push("symlink target differs".into());
        }
        if ea.xattrs != eb.xattrs {
            what.push("xattrs differ".into());
        }
        if ea.hash != eb.hash {
            what.push("content differs".into());
        }
        if ea.link_leader != eb.link_leader {
            what.push(format!(
                "hard links differ ({:?} vs {:?})",
                ea.link_leader, eb.link_leader
            ));
        }
        if !what.is_empty() {
            diffs.push(Difference {
                path: path.clone(),
                what: what.join(", "),
            });
        }
    }
    for path in tb.keys().filter(|p| !ta.contains_key(*p)) {
        diffs.push(Difference {
            path: path.clone(),
            what: "only on the second side".into(),
        });
    }
    Ok(diffs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn pair() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        for d in [&a, &b] {
            fs::create_dir_all(d.join("sub")).unwrap();
            fs::write(d.join("sub/f"), b"same").unwrap();
            fs::create_dir_all(d.join(META_DIR)).unwrap();
        }
        fs::write(a.join(META_DIR).join("x"), b"ignored").unwrap();
        (t, a, b)
    }

    #[test]
    fn identical_trees_have_no_differences() {
        let (_t, a, b) = pair();
        assert_eq!(compare_trees(&a, &b).unwrap(), vec![]);
    }

    #[test]
    fn finds_content_mode_and_missing_entries() {
        let (_t, a, b) = pair();
        fs::write(b.join("sub/f"), b"diff").unwrap();
        fs::write(a.join("only"), b"").unwrap();
        fs::set_permissions(a.join("sub"), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        let d = compare_trees(&a, &b).unwrap();
        let text: Vec<String> = d.iter().map(|d| d.to_string()).collect();
        assert!(
            text.iter()
                .any(|t| t.starts_with("sub/f") && t.contains("content differs")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t.starts_with("only") && t.contains("only on the first")),
            "{text:?}"
        );
        assert!(
            text.iter().any(|t| t.starts_with("sub:") && t.contains("mode")),
            "{text:?}"
        );
    }

    #[test]
    fn finds_broken_hard_links() {
        let (_t, a, b) = pair();
        fs::hard_link(a.join("sub/f"), a.join("g")).unwrap();
        fs::write(b.join("g"), b"same").unwrap();
        let d = compare_trees(&a, &b).unwrap();
        assert!(d.iter().any(|d| d.what.contains("hard links")), "{d:?}");
    }

    #[test]
    fn finds_symlink_and_xattr_differences() {
        let (_t, a, b) = pair();
        std::os::unix::fs::symlink("x", a.join("l")).unwrap();
        std::os::unix::fs::symlink("y", b.join("l")).unwrap();
        let d = compare_trees(&a, &b).unwrap();
        assert!(d.iter().any(|d| d.what.contains("symlink target")), "{d:?}");
        let c = CString::new(a.join("sub/f").as_os_str().as_bytes()).unwrap();
        // SAFETY: valid C strings and value buffer.
        let r = unsafe { libc::lsetxattr(c.as_ptr(), c"user.k".as_ptr(), b"v".as_ptr().cast(), 1, 0) };
        if r == 0 {
            let d = compare_trees(&a, &b).unwrap();
            assert!(d.iter().any(|d| d.what.contains("xattrs")), "{d:?}");
        } else {
            // tmpfs before 6.6 had no user xattrs; this kernel is newer, so say so loudly.
            panic!(
                "cannot set a user xattr in {}: {}",
                a.display(),
                io::Error::last_os_error()
            );
        }
    }
}

/// How many times online verify looks again at paths that differ before it
/// reports them, and how long it waits between looks: a file being written
/// may differ for the moment between its two writes.
const RECHECKS: u32 = 3;
const RECHECK_PAUSE: std::time::Duration = std::time::Duration::from_millis(500);

/// The outcome of `mirrorfs verify`, for `--json`.
#[derive(Debug, serde::Serialize)]
struct Report {
    primary: PathBuf,
    mirror: PathBuf,
    online: bool,
    /// Differences found and repaired (with `--repair`).
    #[serde(skip_serializing_if = "Option::is_none")]
    repaired: Option<usize>,
    differences: Vec<DiffJson>,
}

#[derive(Debug, serde::Serialize)]
struct DiffJson {
    path: String,
    what: String,
}

/// Copies the good side over the bad one at each differing path: online
/// through the daemon (from the primary, with the mount live), offline
/// directly (from the side that is not recorded stale).
fn repair(primary: &Path, mirror: &Path, online: Option<&Path>, diffs: &[Difference]) -> Result<(), String> {
    let mut paths: Vec<PathBuf> = diffs.iter().map(|d| d.path.clone()).collect();
    paths.dedup();
    if let Some(mnt) = online {
        let manual = crate::recovery::catchup::Manual {
            paths,
            ..Default::default()
        };
        return crate::control::request_resync(mnt, manual, true)
            .map(drop)
            .map_err(|f| f.message().to_string());
    }
    use crate::spec::Side;
    let good = match crate::meta::read_stale(mirror) {
        Ok(Some(rec)) if rec.stale == "primary" => Side::Mirror,
        _ => Side::Primary,
    };
    let roots = [primary, mirror];
    let open = |side: Side| {
        crate::volume::Volume::open(side, roots[side.index()])
            .map_err(|e| format!("{}: {e}", roots[side.index()].display()))
    };
    let access = crate::recovery::resync::Direct {
        src: open(good)?,
        dst: std::sync::Arc::new(open(good.other())?),
    };
    let stats = crate::recovery::resync::Stats::default();
    let mut copier = crate::recovery::resync::Copier::new(&access, &stats);
    for p in &paths {
        copier
            .reconcile(p, crate::recovery::resync::Depth::Entry)
            .map_err(|e| format!("repairing /{}: {e}", p.display()))?;
    }
    eprintln!("repaired {} path(s) from the {good}", paths.len());
    Ok(())
}

/// `mirrorfs verify [--repair] [--json] (MOUNTPOINT | 'PRIMARY|MIRROR')`: 0
/// when the sides are identical (after repair, with `--repair`), 1 when
/// they differ or cannot be compared.
pub fn run(target: &str, json: bool, repair_them: bool) -> Result<u8, crate::runtime::Failure> {
    use crate::runtime::Failure;
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let (primary, mirror, online) = if target.contains('|') {
        let (p, m) = crate::spec::split_spec(target).map_err(Failure::Usage)?;
        (
            crate::spec::absolutize(&p, &cwd),
            crate::spec::absolutize(&m, &cwd),
            false,
        )
    } else {
        let st = crate::control::query(Path::new(target))?;
        if let Some(s) = st.sides.iter().find(|s| s.state != "UP") {
            return Err(Failure::Runtime(format!(
                "the {} of {} is {}: there is nothing to compare it with until it is back",
                s.side,
                st.mountpoint.display(),
                s.state
            )));
        }
        let path = |side| st.sides.iter().find(|s| s.side == side).map(|s| s.path.clone());
        match (path(crate::spec::Side::Primary), path(crate::spec::Side::Mirror)) {
            (Some(p), Some(m)) => (p, m, true),
            _ => return Err(Failure::Runtime("the daemon did not name both sides".into())),
        }
    };
    let compare = || {
        compare_trees(&primary, &mirror)
            .map_err(|e| Failure::Runtime(format!("comparing {} and {}: {e}", primary.display(), mirror.display())))
    };
    let mut diffs = compare()?;
    // Online, a difference must persist: a change in flight is applied to
    // both sides within moments.
    let mut looks = 0;
    while online && !diffs.is_empty() && looks < RECHECKS {
        std::thread::sleep(RECHECK_PAUSE);
        let again = compare()?;
        diffs.retain(|d| again.iter().any(|a| a.path == d.path));
        looks += 1;
    }
    let mut repaired = None;
    if repair_them && !diffs.is_empty() {
        let mnt = online.then(|| Path::new(target));
        repair(&primary, &mirror, mnt, &diffs).map_err(Failure::Runtime)?;
        let left = compare()?;
        repaired = Some(diffs.len());
        diffs = left;
    }
    if json {
        let report = Report {
            primary: primary.clone(),
            mirror: mirror.clone(),
            online,
            repaired,
            differences: diffs
                .iter()
                .map(|d| DiffJson {
                    path: format!("/{}", d.path.display()),
                    what: d.what.clone(),
                })
                .collect(),
        };
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        for d in &diffs {
            println!("/{}: {}", d.path.display(), d.what);
        }
        if let Some(n) = repaired {
            println!("{n} difference(s) repaired");
        }
        println!(
            "{} difference(s) between {} and {}",
            diffs.len(),
            primary.display(),
            mirror.display()
        );
    }
    Ok(if diffs.is_empty() { 0 } else { 1 })
}
