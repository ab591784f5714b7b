//! The inode table and the handle table.
//!
//! Owns: the mapping from the kernel's inode numbers to relative paths. Each
//! node has the names it is known by (`(parent, name)` pairs: more than one
//! for hard links); a path is built by walking names up to the root, so a
//! directory rename moves its whole subtree in O(1). A node stays while the
//! kernel holds lookups on it or while other nodes are named under it.
//! Nodes are keyed by the answering side's `(dev, ino)`, so hard links found
//! under different names share one inode number.
//!
//! Also the open files as the resyncer sees them (`OpenFiles`): it detaches
//! them from a side about to be caught up and re-attaches them after.
//!
//! Lock order: `Nodes` has one mutex, never held across a syscall.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::engine::Engine;
use crate::health::is_side_failure;
use crate::spec::Side;

pub const ROOT: u64 = 1;

/// A backing object's identity on the side that answered for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub side: Side,
    pub dev: u64,
    pub ino: u64,
}

#[derive(Debug)]
struct Node {
    /// Every `(parent, name)` this node is known by; empty once unlinked.
    names: Vec<(u64, OsString)>,
    lookups: u64,
    /// How many names of other nodes have this node as parent.
    children: u64,
    key: Key,
}

#[derive(Debug)]
struct Inner {
    nodes: HashMap<u64, Node>,
    by_key: HashMap<Key, u64>,
    by_name: HashMap<(u64, OsString), u64>,
    next: u64,
}

#[derive(Debug)]
pub struct Nodes {
    inner: Mutex<Inner>,
}

fn enoent() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOENT)
}

impl Nodes {
    pub fn new(root_key: Key) -> Nodes {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                names: Vec::new(),
                lookups: 1,
                children: 0,
                key: root_key,
            },
        );
        let mut by_key = HashMap::new();
        by_key.insert(root_key, ROOT);
        Nodes {
            inner: Mutex::new(Inner {
                nodes,
                by_key,
                by_name: HashMap::new(),
                next: ROOT + 1,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The relative path of `ino` ("" for the root).
    pub fn path(&self, ino: u64) -> io::Result<PathBuf> {
        let inner = self.lock();
        inner.path(ino)
    }

    /// The relative path of `name` under `parent`.
    pub fn child_path(&self, parent: u64, name: &OsStr) -> io::Result<PathBuf> {
        let mut p = self.path(parent)?;
        p.push(name);
        Ok(p)
    }

    /// Records a successful lookup of `name` under `parent` answered with
    /// `key`, and returns the inode number, adding one lookup reference.
    pub fn remember(&self, parent: u64, name: &OsStr, key: Key) -> u64 {
        let mut inner = self.lock();
        let name_key = (parent, name.to_os_string());
        // A different object that had this name before (renamed or replaced
        // behind our back) loses the name.
        if let Some(&old) = inner.by_name.get(&name_key)
            && inner.nodes.get(&old).is_some_and(|n| n.key != key)
        {
            inner.drop_name(old, parent, name);
        }
        // A node that has lost every name (unlinked, perhaps still open)
        // is not this object even if the backing inode number was reused:
        // a new file gets a new inode number, so the kernel never mixes a
        // deleted file's cached pages or size into it.
        let live = |n: &Node| !n.names.is_empty();
        let ino = match inner.by_key.get(&key) {
            Some(&ino) if ino == ROOT || inner.nodes.get(&ino).is_some_and(live) => ino,
            _ => {
                let ino = inner.next;
                inner.next += 1;
                inner.nodes.insert(
                    ino,
                    Node {
                        names: Vec::new(),
                        lookups: 0,
                        children: 0,
                        key,
                    },
                );
                inner.by_key.insert(key, ino);
                ino
            }
        };
        if !inner.by_name.contains_key(&name_key) {
            inner.add_name(ino, parent, name);
        }
        if let Some(n) = inner.nodes.get_mut(&ino) {
            n.lookups += 1;
        }
        ino
    }

    /// The kernel dropped `n` lookup references.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let mut inner = self.lock();
        if let Some(node) = inner.nodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(n);
        }
        inner.maybe_remove(ino);
    }

    /// Whether `name` under `parent` is a known entry.
    pub fn has_child(&self, parent: u64, name: &OsStr) -> bool {
        self.lock().by_name.contains_key(&(parent, name.to_os_string()))
    }

    /// `name` under `parent` was removed.
    pub fn unlinked(&self, parent: u64, name: &OsStr) {
        let mut inner = self.lock();
        if let Some(&ino) = inner.by_name.get(&(parent, name.to_os_string())) {
            inner.drop_name(ino, parent, name);
            inner.maybe_remove(ino);
        }
    }

    /// `ino` got a new hard link `name` under `parent`.
    pub fn linked(&self, ino: u64, parent: u64, name: &OsStr) {
        let mut inner = self.lock();
        if let Some(&old) = inner.by_name.get(&(parent, name.to_os_string())) {
            inner.drop_name(old, parent, name);
            inner.maybe_remove(old);
        }
        if inner.nodes.contains_key(&ino) {
            inner.add_name(ino, parent, name);
        }
    }

    /// A rename succeeded. With `exchange`, the two names swapped objects.
    pub fn renamed(&self, op: u64, on: &OsStr, np: u64, nn: &OsStr, exchange: bool) {
        let mut inner = self.lock();
        let src = inner.by_name.get(&(op, on.to_os_string())).copied();
        let dst = inner.by_name.get(&(np, nn.to_os_string())).copied();
        if let Some(s) = src {
            inner.drop_name(s, op, on);
        }
        if let Some(d) = dst {
            inner.drop_name(d, np, nn);
        }
        if let Some(s) = src {
            inner.add_name(s, np, nn);
        }
        if let Some(d) = dst {
            if exchange {
                inner.add_name(d, op, on);
            }
            inner.maybe_remove(d);
        }
    }

    pub fn len(&self) -> usize {
        self.lock().nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    fn path(&self, ino: u64) -> io::Result<PathBuf> {
        let mut parts: Vec<&OsStr> = Vec::new();
        let mut cur = ino;
        while cur != ROOT {
            let node = self.nodes.get(&cur).ok_or_else(enoent)?;
            let (parent, name) = node.names.first().ok_or_else(enoent)?;
            parts.push(name);
            cur = *parent;
            if parts.len() > 4096 {
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
        }
        let mut p = PathBuf::new();
        for part in parts.iter().rev() {
            p.push(part);
        }
        Ok(p)
    }

    fn add_name(&mut self, ino: u64, parent: u64, name: &OsStr) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.names.push((parent, name.to_os_string()));
        }
        if let Some(p) = self.nodes.get_mut(&parent) {
            p.children += 1;
        }
        self.by_name.insert((parent, name.to_os_string()), ino);
    }

    fn drop_name(&mut self, ino: u64, parent: u64, name: &OsStr) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.names.retain(|(p, nm)| !(*p == parent && nm == name));
        }
        self.by_name.remove(&(parent, name.to_os_string()));
        if let Some(p) = self.nodes.get_mut(&parent) {
            p.children = p.children.saturating_sub(1);
        }
        self.maybe_remove(parent);
    }

    /// Removes a node nobody refers to, then its parents in turn.
    fn maybe_remove(&mut self, ino: u64) {
        let mut todo = vec![ino];
        while let Some(ino) = todo.pop() {
            if ino == ROOT {
                continue;
            }
            let removable = self.nodes.get(&ino).is_some_and(|n| n.lookups == 0 && n.children == 0);
            if !removable {
                continue;
            }
            let Some(node) = self.nodes.remove(&ino) else { continue };
            if self.by_key.get(&node.key) == Some(&ino) {
                self.by_key.remove(&node.key);
            }
            for (parent, name) in node.names {
                self.by_name.remove(&(parent, name));
                if let Some(p) = self.nodes.get_mut(&parent) {
                    p.children = p.children.saturating_sub(1);
                    todo.push(parent);
                }
            }
        }
    }
}

/// An open file: one fd per side that was up when it was opened. A side
/// being resynced gets its fd when the file has been caught up there
/// (`attach`); until then a call on that side finds none (`NOT_ATTACHED`).
#[derive(Debug)]
pub struct OpenFile {
    pub ino: u64,
    /// The flags it was opened with, to re-open it on a returning side.
    pub flags: i32,
    fds: [Mutex<Option<Arc<OwnedFd>>>; 2],
    /// Async mode: its path on the primary, and the names generation
    /// (`Follow::generation`) it was read in.
    path: Mutex<Option<(u64, Option<PathBuf>)>>,
}

impl OpenFile {
    pub fn new(ino: u64, flags: i32, fds: [Option<OwnedFd>; 2]) -> OpenFile {
        let [p, m] = fds;
        OpenFile {
            ino,
            flags,
            fds: [Mutex::new(p.map(Arc::new)), Mutex::new(m.map(Arc::new))],
            path: Mutex::new(None),
        }
    }

    /// Its path as `read` gives it, read again only when the names
    /// generation is no longer `generation`.
    pub fn path_in(&self, generation: u64, read: impl FnOnce() -> Option<PathBuf>) -> Option<PathBuf> {
        let mut slot = self.path.lock().unwrap_or_else(|e| e.into_inner());
        match &*slot {
            Some((g, path)) if *g == generation => path.clone(),
            _ => {
                let path = read();
                *slot = Some((generation, path.clone()));
                path
            }
        }
    }

    fn slot(&self, side: Side) -> MutexGuard<'_, Option<Arc<OwnedFd>>> {
        self.fds[side.index()].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The fd on `side`; a call made with it keeps it open until it returns.
    pub fn fd(&self, side: Side) -> io::Result<Arc<OwnedFd>> {
        self.slot(side)
            .clone()
            .ok_or_else(|| io::Error::from_raw_os_error(crate::engine::NOT_ATTACHED))
    }

    pub fn has_fd(&self, side: Side) -> bool {
        self.slot(side).is_some()
    }

    /// Takes out `side`'s fd, to be closed elsewhere.
    pub fn take_fd(&self, side: Side) -> Option<Arc<OwnedFd>> {
        self.slot(side).take()
    }

    /// Gives the file an fd on `side` (a returning side); returns the one
    /// it replaces, to be closed elsewhere.
    pub fn attach(&self, side: Side, fd: OwnedFd) -> Option<Arc<OwnedFd>> {
        self.slot(side).replace(Arc::new(fd))
    }
}

/// An open directory: a snapshot of the primary's listing, refreshed when
/// the kernel reads from offset 0.
#[derive(Debug, Default)]
pub struct OpenDir {
    pub ino: u64,
    pub entries: Mutex<Vec<crate::volume::DirEntry>>,
}

/// Open files and directories by handle number.
#[derive(Debug)]
pub struct Handles<T> {
    map: Mutex<HashMap<u64, Arc<T>>>,
    next: AtomicU64,
}

impl<T> Default for Handles<T> {
    fn default() -> Self {
        Handles {
            map: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }
}

impl<T> Handles<T> {
    pub fn insert(&self, v: T) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, Arc::new(v));
        fh
    }

    pub fn get(&self, fh: u64) -> io::Result<Arc<T>> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh)
            .cloned()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))
    }

    pub fn remove(&self, fh: u64) -> Option<Arc<T>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).remove(&fh)
    }

    /// Every entry, for a sweep (re-attaching files to a returning side).
    pub fn all(&self) -> Vec<Arc<T>> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Any handle matching `pred` (used to stat an unlinked open file).
    pub fn find(&self, pred: impl Fn(&T) -> bool) -> Option<Arc<T>> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .find(|v| pred(v))
            .cloned()
    }
}

/// The open files, as the resyncer sees them: it detaches them from a side
/// about to be caught up, and re-attaches them to it once it is.
#[derive(Clone)]
pub struct OpenFiles {
    files: Arc<Handles<OpenFile>>,
    nodes: Arc<Nodes>,
}

impl OpenFiles {
    pub fn new(files: Arc<Handles<OpenFile>>, nodes: Arc<Nodes>) -> OpenFiles {
        OpenFiles { files, nodes }
    }

    /// Drops every open file's fd on `side`: fds from before an outage may
    /// name files the resync replaces.
    pub fn detach(&self, side: Side, engine: &Engine) {
        for f in self.files.all() {
            if let Some(fd) = f.take_fd(side) {
                engine.retire(fd);
            }
        }
    }

    /// Opens, on `side`, every open file that has no fd there yet, by its
    /// path. Must run with changes held off. Returns the paths that could
    /// not be opened there (they are caught up again); a side failure is
    /// an error. An open file that has been unlinked has no path and stays
    /// on the other side alone.
    pub fn reattach(&self, side: Side, engine: &Engine) -> io::Result<Vec<PathBuf>> {
        let mut missing = Vec::new();
        for f in self.files.all() {
            if f.has_fd(side) {
                continue;
            }
            let Ok(path) = self.nodes.path(f.ino) else { continue };
            let (p, flags) = (path.clone(), f.flags);
            match engine.on_side(side, "open", move |v| v.open_file(&p, flags)) {
                Ok(fd) => {
                    if let Some(old) = f.attach(side, fd) {
                        engine.retire(old);
                    }
                }
                Err(e) if is_side_failure(e.raw_os_error().unwrap_or(libc::EIO)) => return Err(e),
                Err(_) => missing.push(path),
            }
        }
        Ok(missing)
    }

    /// `reattach` for the open files named `rel`: called by the copier as
    /// soon as `rel` exists on `side`, with changes held off.
    pub fn reattach_path(&self, side: Side, engine: &Engine, rel: &Path) -> io::Result<()> {
        for f in self.files.all() {
            if f.has_fd(side) || self.nodes.path(f.ino).ok().as_deref() != Some(rel) {
                continue;
            }
            let (p, flags) = (rel.to_path_buf(), f.flags);
            let fd = engine.on_side(side, "open", move |v| v.open_file(&p, flags))?;
            if let Some(old) = f.attach(side, fd) {
                engine.retire(old);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ino: u64) -> Key {
        Key {
            side: Side::Primary,
            dev: 1,
            ino,
        }
    }

    #[test]
    fn a_reused_backing_inode_is_a_new_node_while_the_old_one_is_unlinked() {
        let n = Nodes::new(key(1));
        let a = n.remember(ROOT, OsStr::new("journal"), key(7));
        n.unlinked(ROOT, OsStr::new("journal"));
        // The kernel still holds `a` (an open, deleted file); the backing
        // filesystem hands out inode 7 again to a new file.
        let b = n.remember(ROOT, OsStr::new("journal"), key(7));
        assert_ne!(a, b);
        assert_eq!(n.path(b).unwrap(), PathBuf::from("journal"));
        n.forget(a, 1);
        // Forgetting the old node leaves the new one reachable by key.
        assert_eq!(n.remember(ROOT, OsStr::new("journal"), key(7)), b);
    }

    #[test]
    fn builds_paths_and_moves_subtrees() {
        let n = Nodes::new(key(2));
        let d = n.remember(ROOT, OsStr::new("d"), key(10));
        let f = n.remember(d, OsStr::new("f"), key(11));
        assert_eq!(n.path(f).unwrap(), PathBuf::from("d/f"));
        n.renamed(ROOT, OsStr::new("d"), ROOT, OsStr::new("e"), false);
        assert_eq!(n.path(f).unwrap(), PathBuf::from("e/f"));
    }

    #[test]
    fn hard_links_share_an_inode_and_survive_unlink_of_one_name() {
        let n = Nodes::new(key(2));
        let a = n.remember(ROOT, OsStr::new("a"), key(10));
        let b = n.remember(ROOT, OsStr::new("b"), key(10));
        assert_eq!(a, b);
        n.unlinked(ROOT, OsStr::new("a"));
        assert_eq!(n.path(a).unwrap(), PathBuf::from("b"));
        n.unlinked(ROOT, OsStr::new("b"));
        assert_eq!(n.path(a).unwrap_err().raw_os_error(), Some(libc::ENOENT));
    }

    #[test]
    fn forgets_nodes_and_keeps_parents_of_named_children() {
        let n = Nodes::new(key(2));
        let d = n.remember(ROOT, OsStr::new("d"), key(10));
        let f = n.remember(d, OsStr::new("f"), key(11));
        n.forget(d, 1);
        assert_eq!(n.path(f).unwrap(), PathBuf::from("d/f"), "parent kept for its child");
        n.forget(f, 1);
        assert_eq!(n.len(), 1, "only the root remains");
    }

    #[test]
    fn exchange_swaps_names() {
        let n = Nodes::new(key(2));
        let a = n.remember(ROOT, OsStr::new("a"), key(10));
        let b = n.remember(ROOT, OsStr::new("b"), key(11));
        n.renamed(ROOT, OsStr::new("a"), ROOT, OsStr::new("b"), true);
        assert_eq!(n.path(a).unwrap(), PathBuf::from("b"));
        assert_eq!(n.path(b).unwrap(), PathBuf::from("a"));
    }

    #[test]
    fn rename_over_a_file_detaches_the_old_one() {
        let n = Nodes::new(key(2));
        let a = n.remember(ROOT, OsStr::new("a"), key(10));
        let b = n.remember(ROOT, OsStr::new("b"), key(11));
        n.renamed(ROOT, OsStr::new("a"), ROOT, OsStr::new("b"), false);
        assert_eq!(n.path(a).unwrap(), PathBuf::from("b"));
        assert!(n.path(b).is_err());
    }

    #[test]
    fn an_open_files_path_is_read_once_per_generation() {
        let f = OpenFile::new(1, 0, [None, None]);
        let reads = std::cell::Cell::new(0);
        let read = |name: &str| {
            reads.set(reads.get() + 1);
            Some(PathBuf::from(name))
        };
        assert_eq!(f.path_in(0, || read("a")), Some(PathBuf::from("a")));
        assert_eq!(
            f.path_in(0, || read("b")),
            Some(PathBuf::from("a")),
            "same generation: kept"
        );
        assert_eq!(reads.get(), 1);
        assert_eq!(
            f.path_in(1, || read("b")),
            Some(PathBuf::from("b")),
            "a new generation: read again"
        );
        assert_eq!(f.path_in(2, || None), None, "no name any more");
        assert_eq!(reads.get(), 2);
    }
}
