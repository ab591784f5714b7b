//! Parses and validates the `PRIMARY|MIRROR` spec, the mountpoint and the
//! `-o` mount options.
//!
//! Owns: the option vocabulary (one `key=value` list shared by `-o`, fstab and
//! the mount helper) and every refusal listed in SPEC section 1. It only looks
//! at the filesystem through `stat`, except that `-o create` creates missing
//! directories. It knows nothing of FUSE or of the engine.

use std::fmt;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// One side of the pair. The primary answers reads while it is up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Primary,
    Mirror,
}

impl Side {
    pub const BOTH: [Side; 2] = [Side::Primary, Side::Mirror];

    pub fn index(self) -> usize {
        match self {
            Side::Primary => 0,
            Side::Mirror => 1,
        }
    }

    pub fn other(self) -> Side {
        match self {
            Side::Primary => Side::Mirror,
            Side::Mirror => Side::Primary,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Side::Primary => "primary",
            Side::Mirror => "mirror",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Side {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "primary" => Ok(Side::Primary),
            "mirror" => Ok(Side::Mirror),
            other => Err(format!("unknown side '{other}': expected primary or mirror")),
        }
    }
}

/// The mount options. Defaults are those of an empty `-o`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// `create`: create missing backing directories and the mountpoint.
    pub create: bool,
    /// `ro`: read-only mount.
    pub read_only: bool,
    /// `allow_other`: other users may use the mount; the kernel checks
    /// permissions (`default_permissions`).
    pub allow_other: bool,
    /// `fsname=NAME`: the source shown in `/proc/mounts`. Default: the spec.
    pub fsname: Option<String>,
    /// `mirror_skip`: start even if one side is missing or unusable.
    pub mirror_skip: bool,
    /// `noswitch`: fail-stop.
    pub noswitch: bool,
    /// `mirrors=off`: run on the primary alone.
    pub mirrors_off: bool,
    /// `probe_interval=S`, default 5 s.
    pub probe_interval: Duration,
    /// `side_timeout=S`, default 30 s.
    pub side_timeout: Duration,
    /// `noautoresync`: a returning side waits for `mirrorfs resync`.
    pub noautoresync: bool,
    /// `hook=PROGRAM`: run for each event, with the event as JSON on stdin.
    pub hook: Option<PathBuf>,
    /// `async`: the mirror follows from an ordered change log.
    pub asynchronous: bool,
    /// `max_lag=S`, default 5 s: the oldest change not yet on the mirror is
    /// never older (writers wait beyond it).
    pub max_lag: Duration,
    /// `max_log=SIZE`, default 1 GiB: the change log kept for a mirror that
    /// is down, before the missed-change journal and a resync take over.
    pub max_log: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            create: false,
            read_only: false,
            allow_other: false,
            fsname: None,
            mirror_skip: false,
            noswitch: false,
            mirrors_off: false,
            probe_interval: Duration::from_secs(5),
            side_timeout: Duration::from_secs(30),
            noautoresync: false,
            hook: None,
            asynchronous: false,
            max_lag: Duration::from_secs(5),
            max_log: 1 << 30,
        }
    }
}

/// Options that mount(8) and fstab pass along and that change nothing here.
const IGNORED_OPTIONS: &[&str] = &[
    "rw",
    "defaults",
    "auto",
    "noauto",
    "nofail",
    "_netdev",
    "user",
    "users",
    "nouser",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "default_permissions",
];

/// A size: a number of bytes, or of KiB, MiB, GiB or TiB with a suffix
/// (`K`, `KiB`, `M`, `MiB`, `G`, `GiB`, `T`, `TiB`; case does not matter).
fn parse_size(key: &str, value: &str) -> Result<u64, String> {
    let bad = || format!("option {key}={value}: expected a size such as 512M or 2G");
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => return Err(bad()),
    };
    let bytes = n.checked_mul(1 << shift).ok_or_else(bad)?;
    if bytes == 0 {
        return Err(format!("option {key}={value}: must be more than 0"));
    }
    Ok(bytes)
}

fn parse_seconds(key: &str, value: &str) -> Result<Duration, String> {
    let secs: f64 = value
        .parse()
        .map_err(|_| format!("option {key}={value}: expected a number of seconds"))?;
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!("option {key}={value}: must be more than 0 seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl Options {
    /// Parses a list of `-o` values, each of which may hold several
    /// comma-separated options.
    pub fn parse<S: AsRef<str>>(lists: &[S]) -> Result<Options, String> {
        let mut o = Options::default();
        let mut lag_or_log = None;
        for list in lists {
            for opt in list.as_ref().split(',').filter(|s| !s.is_empty()) {
                o.apply(opt)?;
                if opt.starts_with("max_lag=") || opt.starts_with("max_log=") {
                    lag_or_log = Some(opt.split('=').next().unwrap_or(opt).to_string());
                }
            }
        }
        if let Some(key) = lag_or_log
            && !o.asynchronous
        {
            return Err(format!("option {key} needs -o async"));
        }
        if o.asynchronous && o.mirrors_off {
            return Err("options async and mirrors=off cannot be combined: mirrors=off has no mirror to follow".into());
        }
        if o.asynchronous && o.noswitch {
            return Err(
                "options async and noswitch cannot be combined: in async mode the mirror fails after the caller has its answer"
                    .into(),
            );
        }
        Ok(o)
    }

    fn apply(&mut self, opt: &str) -> Result<(), String> {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        let flag = |v: Option<&str>| match v {
            None => Ok(true),
            Some(v) => Err(format!("option {key} takes no value (got {key}={v})")),
        };
        match key {
            "create" => self.create = flag(value)?,
            "ro" => self.read_only = flag(value)?,
            "allow_other" => self.allow_other = flag(value)?,
            "fsname" => match value {
                Some(v) if !v.is_empty() => self.fsname = Some(v.to_string()),
                _ => return Err("option fsname needs a value: fsname=NAME".into()),
            },
            "mirror_skip" => self.mirror_skip = flag(value)?,
            "noswitch" => self.noswitch = flag(value)?,
            "noautoresync" => self.noautoresync = flag(value)?,
            "mirrors" => match value {
                Some("off") => self.mirrors_off = true,
                Some("on") => self.mirrors_off = false,
                _ => return Err("option mirrors takes on or off: mirrors=off".into()),
            },
            "probe_interval" => {
                self.probe_interval = parse_seconds(key, value.unwrap_or(""))?;
            }
            "side_timeout" => self.side_timeout = parse_seconds(key, value.unwrap_or(""))?,
            "async" => self.asynchronous = flag(value)?,
            "max_lag" => self.max_lag = parse_seconds(key, value.unwrap_or(""))?,
            "max_log" => self.max_log = parse_size(key, value.unwrap_or(""))?,
            "hook" => match value {
                Some(v) if !v.is_empty() => self.hook = Some(PathBuf::from(v)),
                _ => return Err("option hook needs a program: hook=PROGRAM".into()),
            },
            k if IGNORED_OPTIONS.contains(&k) => {}
            _ => return Err(format!("unknown mount option '{opt}'")),
        }
        Ok(())
    }
}

/// The program of `hook=PROGRAM`, as an absolute path: a name with a `/` is
/// taken against `cwd`, a bare name is looked up in `PATH`. A program that
/// does not exist, is not a regular file or is not executable is refused,
/// so that a typo is seen at mount rather than at the first failure.
pub fn resolve_hook(hook: &Path, cwd: &Path) -> Result<PathBuf, String> {
    let named = |p: &Path| format!("hook={}", p.display());
    let candidates: Vec<PathBuf> = if hook.as_os_str().as_bytes().contains(&b'/') {
        vec![absolutize(hook, cwd)]
    } else {
        let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        std::env::split_paths(&path)
            .map(|d| absolutize(&d.join(hook), cwd))
            .collect()
    };
    let mut found = None;
    for c in &candidates {
        match fs::metadata(c) {
            Ok(md) if md.is_file() => {
                if nix::unistd::access(c.as_path(), nix::unistd::AccessFlags::X_OK).is_ok() {
                    return Ok(c.clone());
                }
                found.get_or_insert(format!("{}: {} is not executable", named(hook), c.display()));
            }
            Ok(_) => {
                found.get_or_insert(format!("{}: {} is not a regular file", named(hook), c.display()));
            }
            Err(_) => {}
        }
    }
    Err(found.unwrap_or_else(|| match candidates.as_slice() {
        [one] => format!("{}: {} does not exist", named(hook), one.display()),
        _ => format!("{}: no such program in PATH", named(hook)),
    }))
}

/// A validated pair of sides and its mountpoint, all absolute and canonical.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountSpec {
    pub primary: PathBuf,
    pub mirror: PathBuf,
    pub mountpoint: PathBuf,
}

impl MountSpec {
    pub fn side(&self, side: Side) -> &Path {
        match side {
            Side::Primary => &self.primary,
            Side::Mirror => &self.mirror,
        }
    }

    /// The `PRIMARY|MIRROR` form, used as the default fsname.
    pub fn spec_string(&self) -> String {
        format!("{}|{}", self.primary.display(), self.mirror.display())
    }
}

/// Splits `PRIMARY|MIRROR` into its two (not yet resolved) sides.
pub fn split_spec(spec: &str) -> Result<(PathBuf, PathBuf), String> {
    let parts: Vec<&str> = spec.split('|').collect();
    match parts.as_slice() {
        [_] => Err(format!("spec '{spec}' has no '|': expected 'PRIMARY|MIRROR'")),
        [p, m] => {
            if p.is_empty() {
                return Err(format!("spec '{spec}': the primary side is empty"));
            }
            if m.is_empty() {
                return Err(format!("spec '{spec}': the mirror side is empty"));
            }
            Ok((PathBuf::from(p), PathBuf::from(m)))
        }
        _ => Err(format!(
            "spec '{spec}' has more than one '|': expected 'PRIMARY|MIRROR'"
        )),
    }
}

/// Makes `p` absolute against `cwd` and removes `.` and `..` lexically.
pub fn absolutize(p: &Path, cwd: &Path) -> PathBuf {
    let joined = if p.is_absolute() { p.to_path_buf() } else { cwd.join(p) };
    let mut out = PathBuf::from("/");
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// The canonical form of an existing path, or the lexical absolute form of a
/// missing one (so that containment checks still work on missing sides).
fn resolve(p: &Path, cwd: &Path) -> PathBuf {
    let abs = absolutize(p, cwd);
    fs::canonicalize(&abs).unwrap_or(abs)
}

fn is_within(inner: &Path, outer: &Path) -> bool {
    inner != outer && inner.starts_with(outer)
}

/// Validates a spec and mountpoint as SPEC section 1 requires. With
/// `opts.create`, missing sides and the mountpoint are created first.
pub fn validate(spec: &str, mountpoint: &Path, opts: &Options, cwd: &Path) -> Result<MountSpec, String> {
    let (p, m) = split_spec(spec)?;
    let mut sides = [resolve(&p, cwd), resolve(&m, cwd)];
    let mut mnt = resolve(mountpoint, cwd);

    if opts.create {
        for (path, what) in [(&sides[0], "primary"), (&sides[1], "mirror"), (&mnt, "mountpoint")] {
            if fs::symlink_metadata(path).is_err() {
                fs::create_dir_all(path).map_err(|e| format!("cannot create {what} {}: {e}", path.display()))?;
            }
        }
        sides = [resolve(&p, cwd), resolve(&m, cwd)];
        mnt = resolve(mountpoint, cwd);
    }

    let [primary, mirror] = sides;
    for (path, side) in [(&primary, Side::Primary), (&mirror, Side::Mirror)] {
        match fs::metadata(path) {
            Ok(md) if !md.is_dir() => {
                return Err(format!("{side} {} is not a directory", path.display()));
            }
            Ok(_) => {}
            Err(e) if opts.read_only || opts.mirror_skip || (opts.mirrors_off && side == Side::Mirror) => {
                // The mount may run on one side; both missing is an error below.
                log::info!("side={side} path={} missing: {e}", path.display());
            }
            Err(e) => {
                return Err(format!(
                    "{side} {} is missing or unusable ({e}): use -o mirror_skip to start without it, or -o create to create it",
                    path.display()
                ));
            }
        }
    }
    let pmd = fs::metadata(&primary).ok();
    let mmd = fs::metadata(&mirror).ok();
    if pmd.is_none() && mmd.is_none() {
        return Err("both sides are missing".into());
    }
    if let (Some(a), Some(b)) = (&pmd, &mmd)
        && a.dev() == b.dev()
        && a.ino() == b.ino()
    {
        return Err(format!(
            "primary {} and mirror {} are the same directory",
            primary.display(),
            mirror.display()
        ));
    }
    if is_within(&mirror, &primary) {
        return Err(format!(
            "mirror {} is inside primary {}",
            mirror.display(),
            primary.display()
        ));
    }
    if is_within(&primary, &mirror) {
        return Err(format!(
            "primary {} is inside mirror {}",
            primary.display(),
            mirror.display()
        ));
    }
    match fs::metadata(&mnt) {
        Ok(md) if md.is_dir() => {}
        Ok(_) => return Err(format!("mountpoint {} is not a directory", mnt.display())),
        Err(e) => {
            return Err(format!(
                "mountpoint {} is missing ({e}): create it, or use -o create",
                mnt.display()
            ));
        }
    }
    for (side_path, side) in [(&primary, Side::Primary), (&mirror, Side::Mirror)] {
        if mnt == *side_path || is_within(&mnt, side_path) {
            return Err(format!(
                "mountpoint {} is inside the {side} {}",
                mnt.display(),
                side_path.display()
            ));
        }
        if is_within(side_path, &mnt) {
            return Err(format!(
                "the {side} {} is inside mountpoint {}",
                side_path.display(),
                mnt.display()
            ));
        }
    }
    Ok(MountSpec {
        primary,
        mirror,
        mountpoint: mnt,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn dirs(t: &Path, names: &[&str]) {
        for n in names {
            fs::create_dir_all(t.join(n)).unwrap();
        }
    }

    fn check(t: &Path, spec: &str, mnt: &str) -> Result<MountSpec, String> {
        validate(spec, Path::new(mnt), &Options::default(), t)
    }

    #[test]
    fn accepts_two_distinct_dirs_relative_to_cwd() {
        let t = tmp();
        dirs(t.path(), &["a", "b", "m"]);
        let s = check(t.path(), "a|b", "m").unwrap();
        let root = fs::canonicalize(t.path()).unwrap();
        assert_eq!(s.primary, root.join("a"));
        assert_eq!(s.mirror, root.join("b"));
        assert_eq!(s.mountpoint, root.join("m"));
    }

    #[test]
    fn refuses_spec_without_bar() {
        let err = split_spec("a").unwrap_err();
        assert!(err.contains("no '|'"), "{err}");
    }

    #[test]
    fn refuses_spec_with_two_bars() {
        let err = split_spec("a|b|c").unwrap_err();
        assert!(err.contains("more than one '|'"), "{err}");
    }

    #[test]
    fn refuses_empty_sides() {
        assert!(split_spec("|b").unwrap_err().contains("primary side is empty"));
        assert!(split_spec("a|").unwrap_err().contains("mirror side is empty"));
    }

    #[test]
    fn refuses_same_directory_by_inode_not_spelling() {
        let t = tmp();
        dirs(t.path(), &["a", "m"]);
        std::os::unix::fs::symlink(t.path().join("a"), t.path().join("alias")).unwrap();
        let err = check(t.path(), "a|./alias", "m").unwrap_err();
        assert!(err.contains("same directory"), "{err}");
        let err = check(t.path(), "a|x/../a", "m").unwrap_err();
        assert!(err.contains("same directory"), "{err}");
    }

    #[test]
    fn refuses_side_inside_other() {
        let t = tmp();
        dirs(t.path(), &["a/inner", "m"]);
        let err = check(t.path(), "a|a/inner", "m").unwrap_err();
        assert!(err.contains("mirror") && err.contains("inside primary"), "{err}");
        let err = check(t.path(), "a/inner|a", "m").unwrap_err();
        assert!(err.contains("primary") && err.contains("inside mirror"), "{err}");
    }

    #[test]
    fn refuses_mountpoint_inside_side() {
        let t = tmp();
        dirs(t.path(), &["a/m", "b"]);
        let err = check(t.path(), "a|b", "a/m").unwrap_err();
        assert!(
            err.contains("mountpoint") && err.contains("inside the primary"),
            "{err}"
        );
        let err = check(t.path(), "a|b", "b").unwrap_err();
        assert!(err.contains("inside the mirror"), "{err}");
    }

    #[test]
    fn refuses_side_inside_mountpoint() {
        let t = tmp();
        dirs(t.path(), &["m/a", "b"]);
        let err = check(t.path(), "m/a|b", "m").unwrap_err();
        assert!(err.contains("primary") && err.contains("inside mountpoint"), "{err}");
    }

    #[test]
    fn refuses_side_that_is_not_a_directory() {
        let t = tmp();
        dirs(t.path(), &["a", "m"]);
        fs::write(t.path().join("f"), b"x").unwrap();
        let err = check(t.path(), "a|f", "m").unwrap_err();
        assert!(err.contains("mirror") && err.contains("not a directory"), "{err}");
    }

    #[test]
    fn refuses_missing_mirror_and_names_mirror_skip() {
        let t = tmp();
        dirs(t.path(), &["a", "m"]);
        let err = check(t.path(), "a|nope", "m").unwrap_err();
        assert!(err.starts_with("mirror "), "{err}");
        assert!(err.contains("use -o mirror_skip"), "{err}");
    }

    #[test]
    fn refuses_missing_primary_and_names_it() {
        let t = tmp();
        dirs(t.path(), &["b", "m"]);
        let err = check(t.path(), "nope|b", "m").unwrap_err();
        assert!(err.starts_with("primary "), "{err}");
    }

    #[test]
    fn mirror_skip_and_mirrors_off_allow_a_missing_side() {
        let t = tmp();
        dirs(t.path(), &["a", "m"]);
        let skip = Options::parse(&["mirror_skip"]).unwrap();
        assert!(validate("a|nope", Path::new("m"), &skip, t.path()).is_ok());
        assert!(validate("nope|a", Path::new("m"), &skip, t.path()).is_ok());
        assert!(validate("x|nope", Path::new("m"), &skip, t.path()).is_err());
        let off = Options::parse(&["mirrors=off"]).unwrap();
        assert!(validate("a|nope", Path::new("m"), &off, t.path()).is_ok());
        assert!(
            validate("nope|a", Path::new("m"), &off, t.path()).is_err(),
            "the primary is needed"
        );
    }

    #[test]
    fn read_only_allows_one_missing_side() {
        let t = tmp();
        dirs(t.path(), &["a", "m"]);
        let opts = Options::parse(&["ro"]).unwrap();
        assert!(validate("a|nope", Path::new("m"), &opts, t.path()).is_ok());
        assert!(validate("x|nope", Path::new("m"), &opts, t.path()).is_err());
    }

    #[test]
    fn refuses_missing_mountpoint() {
        let t = tmp();
        dirs(t.path(), &["a", "b"]);
        let err = check(t.path(), "a|b", "m").unwrap_err();
        assert!(err.contains("mountpoint") && err.contains("missing"), "{err}");
    }

    #[test]
    fn create_makes_sides_and_mountpoint() {
        let t = tmp();
        let opts = Options::parse(&["create"]).unwrap();
        let s = validate("d/p|d/m", Path::new("d/mnt"), &opts, t.path()).unwrap();
        assert!(s.primary.is_dir() && s.mirror.is_dir() && s.mountpoint.is_dir());
    }

    #[test]
    fn parses_options_with_defaults() {
        let o = Options::parse(&["ro,allow_other", "fsname=pair,create"]).unwrap();
        assert!(o.read_only && o.allow_other && o.create);
        assert_eq!(o.fsname.as_deref(), Some("pair"));
        assert_eq!(o.probe_interval, Duration::from_secs(5));
        assert_eq!(o.side_timeout, Duration::from_secs(30));
        let o = Options::parse(&["side_timeout=2.5,probe_interval=1,mirrors=off"]).unwrap();
        assert_eq!(o.side_timeout, Duration::from_millis(2500));
        assert!(o.mirrors_off);
    }

    #[test]
    fn refuses_bad_options() {
        assert!(Options::parse(&["bogus"]).unwrap_err().contains("unknown mount option"));
        assert!(Options::parse(&["ro=1"]).is_err());
        assert!(Options::parse(&["side_timeout=0"]).is_err());
        assert!(Options::parse(&["side_timeout=abc"]).is_err());
        assert!(Options::parse(&["mirrors=maybe"]).is_err());
    }

    #[test]
    fn parses_the_async_options_and_refuses_what_does_not_go_with_them() {
        let o = Options::parse(&["async"]).unwrap();
        assert!(o.asynchronous);
        assert_eq!(o.max_lag, Duration::from_secs(5));
        assert_eq!(o.max_log, 1 << 30);
        let o = Options::parse(&["async,max_lag=0.5,max_log=512M"]).unwrap();
        assert_eq!(o.max_lag, Duration::from_millis(500));
        assert_eq!(o.max_log, 512 << 20);
        for (size, bytes) in [
            ("4096", 4096u64),
            ("2g", 2 << 30),
            ("3GiB", 3 << 30),
            ("1T", 1 << 40),
            ("8k", 8192),
        ] {
            assert_eq!(
                Options::parse(&[format!("async,max_log={size}")]).unwrap().max_log,
                bytes,
                "{size}"
            );
        }
        for bad in [
            "max_log=0",
            "max_log=1.5G",
            "max_log=12X",
            "max_log=",
            "max_lag=0",
            "max_lag=-1",
        ] {
            let e = Options::parse(&[format!("async,{bad}")]).unwrap_err();
            assert!(e.contains(bad.split('=').next().unwrap()), "{bad}: {e}");
        }
        assert_eq!(
            Options::parse(&["max_lag=2"]).unwrap_err(),
            "option max_lag needs -o async"
        );
        assert_eq!(
            Options::parse(&["max_log=1G"]).unwrap_err(),
            "option max_log needs -o async"
        );
        assert!(
            Options::parse(&["async,mirrors=off"])
                .unwrap_err()
                .contains("cannot be combined")
        );
        assert!(
            Options::parse(&["async,noswitch"])
                .unwrap_err()
                .contains("cannot be combined")
        );
        assert!(Options::parse(&["async=yes"]).is_err());
        assert!(Options::parse(&["fsname="]).is_err());
    }

    #[test]
    fn a_hook_must_be_an_executable_program() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let prog = t.path().join("hook");
        fs::write(&prog, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&prog, fs::Permissions::from_mode(0o644)).unwrap();
        let err = resolve_hook(Path::new("hook"), Path::new("/")).unwrap_err();
        assert!(err.contains("no such program in PATH"), "{err}");
        let err = resolve_hook(Path::new("./hook"), t.path()).unwrap_err();
        assert!(err.contains("not executable"), "{err}");
        let err = resolve_hook(Path::new("./missing"), t.path()).unwrap_err();
        assert!(err.contains("does not exist"), "{err}");
        let err = resolve_hook(t.path(), t.path()).unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
        fs::set_permissions(&prog, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(resolve_hook(Path::new("./hook"), t.path()).unwrap(), prog);
        assert_eq!(
            resolve_hook(Path::new("sh"), Path::new("/"))
                .unwrap()
                .file_name()
                .unwrap(),
            "sh"
        );
    }

    #[test]
    fn absolutize_is_lexical() {
        assert_eq!(
            absolutize(Path::new("../x/./y"), Path::new("/a/b")),
            PathBuf::from("/a/x/y")
        );
    }
}
