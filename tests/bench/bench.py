#!/usr/bin/env python3
"""Benchmark mirrorfs against a plain directory, two plain directories at
once, btrfs RAID1 and mergerfs.

    sudo python3 tests/bench/bench.py [--quick]

Builds mirrorfs in release mode (unless --no-build), then runs every selected
workload on every selected target, repetitions interleaved, and prints the
medians, the ratios to `native` and, for writes, to `dual-native`. Writes the
same data as JSON. Needs root; installs nothing. See tests/bench/README.md.

Python 3.11 standard library only. Everything it mounts, attaches or starts
is undone in `finally` (and atexit) even when a workload fails or the run is
interrupted.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import json
import os
import pwd
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PG_BIN = Path("/usr/lib/postgresql/15/bin")

ALL_TARGETS = ["native", "mirrorfs", "mirrorfs-devfuse", "dual-native", "btrfs-raid1", "mergerfs"]
ALL_WORKLOADS = [
    "seqwrite",
    "randwrite",
    "seqread",
    "randread",
    "metadata",
    "pgbench",
    "sqlite-journal",
    "sqlite-wal",
    "memory",
]
WORKLOAD_ALIASES = {
    "fio": ["seqwrite", "randwrite", "seqread", "randread"],
    "sqlite": ["sqlite-journal", "sqlite-wal"],
    "all": ALL_WORKLOADS,
}
FUSE_TARGETS = {"mirrorfs", "mirrorfs-devfuse", "mergerfs"}
MIRRORFS_TARGETS = {"mirrorfs", "mirrorfs-devfuse"}
# mirrorfs serves through FUSE over io_uring when the kernel's switch is on
# (the bench turns it on); "mirrorfs-devfuse" is the same binary with it
# turned off for the daemon, served through /dev/fuse as before.
URING_SWITCH = Path("/sys/module/fuse/parameters/enable_uring")
# Workloads that a mirror serves from one side: running them on two plain
# directories at once would measure nothing a mirror does.
READ_WORKLOADS = {"seqread", "randread"}

# mergerfs's own recommendation for a branch that needs shared mmap (SQLite
# WAL does): man mergerfs, "You need mmap". One branch, so the create policy
# does not matter; it is kept to match the documented line.
MERGERFS_OPTS = "allow_other,use_ino,cache.files=partial,dropcacheonclose=true,category.create=mfs"

MIB = 1 << 20
GIB = 1 << 30

PROFILES = {
    "full": dict(
        reps=3,
        seq_size=1 * GIB,
        rw_size=256 * MIB,
        rw_time=15,
        rr_size=64 * MIB,
        rr_time=10,
        rr_ramp=3,
        meta_files=20_000,
        mem_files=100_000,
        pg_scale=10,
        pg_time=30,
        sqlite_txns=10_000,
        btrfs_image=4 * GIB,
        min_free=8 * GIB,
    ),
    "quick": dict(
        reps=1,
        seq_size=256 * MIB,
        rw_size=64 * MIB,
        rw_time=4,
        rr_size=64 * MIB,
        rr_time=3,
        rr_ramp=2,
        meta_files=5_000,
        mem_files=20_000,
        pg_scale=2,
        pg_time=8,
        sqlite_txns=1_000,
        btrfs_image=4 * GIB,
        min_free=3 * GIB,
    ),
}

T0 = time.monotonic()


def log(msg: str) -> None:
    el = int(time.monotonic() - T0)
    print(f"[{el // 60:3d}:{el % 60:02d}] {msg}", file=sys.stderr, flush=True)


def hsize(n: int) -> str:
    if n % GIB == 0:
        return f"{n // GIB} GiB"
    return f"{n // MIB} MiB"


class BenchError(Exception):
    """A target or workload that could not run; the run goes on and fails at the end."""


# ------------------------------------------------------------------ cleanup

# Every resource is registered here the moment it exists (LIFO). A Scope
# undoes what was registered inside it; whatever is left when the script
# ends (error, Ctrl-C, SIGTERM) is undone by `cleanup_all`.
_UNDO: list[tuple[str, object]] = []
_CHILDREN: set[subprocess.Popen] = set()


def on_cleanup(desc: str, fn) -> None:
    _UNDO.append((desc, fn))


def _undo_to(depth: int) -> list[str]:
    errors = []
    while len(_UNDO) > depth:
        desc, fn = _UNDO.pop()
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - cleanup must go on
            errors.append(f"{desc}: {e}")
            log(f"cleanup: {desc} failed: {e}")
    return errors


class Scope:
    def __enter__(self):
        self.depth = len(_UNDO)
        return self

    def __exit__(self, *exc):
        self.errors = _undo_to(self.depth)
        return False


_cleaned = False


def cleanup_all() -> None:
    global _cleaned
    if _cleaned:
        return
    _cleaned = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _undo_to(0)
    for p in list(_CHILDREN):
        stop_child(p)


def _on_signal(signum, _frame):
    log(f"{signal.Signals(signum).name}: cleaning up")
    raise SystemExit(128 + signum)


# ------------------------------------------------------------------ processes


def spawn(cmd: list[str], **kw) -> subprocess.Popen:
    p = subprocess.Popen(cmd, **kw)
    _CHILDREN.add(p)
    return p


def stop_child(p: subprocess.Popen, grace: float = 10.0) -> int | None:
    """Waits up to `grace` s for a child this script started, then ends it by pid."""
    try:
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        p.terminate()
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    _CHILDREN.discard(p)
    return p.returncode


def run(cmd: list[str], *, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("text", True)
    kw.setdefault("stdin", subprocess.DEVNULL)
    p = spawn(cmd, **kw)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        _CHILDREN.discard(p)
        raise BenchError(f"{cmd[0]} did not finish within {timeout:.0f} s: {' '.join(map(str, cmd))}")
    _CHILDREN.discard(p)
    cp = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    if check and cp.returncode != 0:
        msg = ((err or "") + (out or "")).strip()[-2000:]
        raise BenchError(f"{' '.join(map(str, cmd))} exited {cp.returncode}: {msg}")
    return cp


@dataclass
class Job:
    """One command of a set started at the same moment (dual-native runs two)."""

    cmd: list[str]
    stdin: Path | None = None
    env: dict | None = None
    cwd: str | None = None
    rc: int | None = None
    secs: float = 0.0
    out: str = ""
    err: str = ""


def run_together(jobs: list[Job], workdir: Path, timeout: float) -> list[Job]:
    """Starts every job at once and waits for all; each job's own wall time is
    taken when it exits. Output goes through files, so no pipe can fill."""
    procs = []
    files = []
    try:
        for j in jobs:
            fo = tempfile.TemporaryFile(dir=workdir)
            fe = tempfile.TemporaryFile(dir=workdir)
            fi = open(j.stdin, "rb") if j.stdin else subprocess.DEVNULL
            files += [fo, fe] + ([fi] if j.stdin else [])
            procs.append((j, fo, fe, fi))
        started = []
        for j, fo, fe, fi in procs:
            t = time.monotonic()
            p = spawn(j.cmd, stdin=fi, stdout=fo, stderr=fe, env=j.env, cwd=j.cwd)
            started.append((j, p, t))

        def waiter(j: Job, p: subprocess.Popen, t: float):
            try:
                p.wait(timeout=timeout)
                j.secs = time.monotonic() - t
            except subprocess.TimeoutExpired:
                pass

        threads = [threading.Thread(target=waiter, args=s, daemon=True) for s in started]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        for j, p, _ in started:
            if p.returncode is None:
                for _, q, _ in started:
                    if q.returncode is None:
                        q.kill()
                        q.wait()
                    _CHILDREN.discard(q)
                raise BenchError(f"{j.cmd[0]} did not finish within {timeout:.0f} s")
            _CHILDREN.discard(p)
            j.rc = p.returncode
        for j, fo, fe, _ in procs:
            fo.seek(0)
            fe.seek(0)
            j.out = fo.read().decode(errors="replace")
            j.err = fe.read().decode(errors="replace")
        return jobs
    finally:
        for f in files:
            f.close()


def pg_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(HOME="/tmp", LC_ALL="C")
    return env


def as_postgres(prog: str, *args: str) -> list[str]:
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--", str(PG_BIN / prog), *args]


# ------------------------------------------------------------------ mounts


def unescape_mount(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mountinfo() -> list[dict]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            a = pre.split()
            b = post.split()
            out.append(
                dict(
                    majmin=a[2],
                    mountpoint=unescape_mount(a[4]),
                    options=a[5],
                    fstype=b[0],
                    source=unescape_mount(b[1]) if len(b) > 1 else "",
                    superopts=b[2] if len(b) > 2 else "",
                )
            )
    return out


def mounted_at(path: Path) -> str | None:
    """The fstype of the topmost mount at `path`, or None."""
    hit = None
    for m in mountinfo():
        if m["mountpoint"] == str(path):
            hit = m["fstype"]
    return hit


def mounts_under(path: Path) -> list[str]:
    p = str(path).rstrip("/") + "/"
    return [m["mountpoint"] for m in mountinfo() if m["mountpoint"].startswith(p) or m["mountpoint"] == str(path)]


def unmount(mnt: Path, cmd: list[str] | None = None) -> None:
    """Unmounts with `cmd` (default umount), then detaches (umount -l) if still mounted."""
    if mounted_at(mnt) is None:
        return
    r = run(cmd or ["umount", str(mnt)], check=False, timeout=120)
    if mounted_at(mnt) is not None:
        log(f"unmount {mnt}: {(r.stderr or r.stdout).strip()}; detaching with umount -l")
        run(["umount", "-l", str(mnt)], check=False, timeout=60)
    if mounted_at(mnt) is not None:
        raise BenchError(f"{mnt} is still mounted")


def wait_mounted(mnt: Path, fstype: str, proc: subprocess.Popen, logfile: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while mounted_at(mnt) != fstype:
        if proc.poll() is not None:
            raise BenchError(f"{fstype} exited with {proc.returncode} before mounting {mnt}: {tail(logfile)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{fstype} did not appear at {mnt} within {timeout:.0f} s: {tail(logfile)}")
        time.sleep(0.02)


def tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip()
    except OSError:
        return ""


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def proc_status_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS"):
                out[k] = int(v.split()[0])
    return out


def system_switches() -> int:
    """Context switches since boot, every CPU (what `perf stat -a -e
    context-switches` counts)."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("ctxt "):
                return int(line.split()[1])
    raise BenchError("/proc/stat has no ctxt line")


def cpu_ns(pid: int) -> int:
    """CPU time of every live thread of `pid`, in ns (schedstat's first field)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended meanwhile
    return total


class CostProbe:
    """Counts what a stretch of work costs per operation: context switches on
    the whole machine (the application, the daemon, the kernel's workers)
    and the FUSE daemon's CPU time. Both move far less with machine noise
    than throughput does."""

    def __init__(self, t: "Target"):
        self.pid = t.daemon.pid if t.daemon else None
        self.switches = system_switches()
        self.cpu = cpu_ns(self.pid) if self.pid else 0

    def per_op(self, name: str, ops: float) -> dict:
        if ops <= 0:
            raise BenchError(f"cost probe {name}: no operations counted")
        out = {f"cs_{name}": (system_switches() - self.switches) / ops}
        if self.pid:
            out[f"cpu_{name}"] = (cpu_ns(self.pid) - self.cpu) / ops / 1000
        return out


# ------------------------------------------------------------------ targets


@dataclass
class Target:
    name: str
    roots: list[Path]
    daemon: subprocess.Popen | None = None


class Bench:
    def __init__(self, args, cfg: dict, workdir: Path, mirrorfs_bin: Path, meta_bin: Path | None):
        self.args = args
        self.cfg = cfg
        self.workdir = workdir
        self.mirrorfs = mirrorfs_bin
        self.meta_bin = meta_bin
        self.sqlite_scripts: dict[str, Path] = {}

    # ---- setup; each registers its own undo in the caller's Scope

    def setup(self, name: str, cell: Path) -> Target:
        cell.mkdir(parents=True)
        os.chmod(cell, 0o755)
        if name == "native":
            d = cell / "data"
            d.mkdir()
            return Target(name, [d])
        if name == "dual-native":
            a, b = cell / "a", cell / "b"
            a.mkdir()
            b.mkdir()
            return Target(name, [a, b])
        if name in MIRRORFS_TARGETS:
            return self.setup_mirrorfs(cell, name)
        if name == "mergerfs":
            return self.setup_mergerfs(cell)
        if name == "btrfs-raid1":
            return self.setup_btrfs(cell)
        raise AssertionError(name)

    def _fuse_daemon(
        self, name: str, fstype: str, cmd: list[str], mnt: Path, logfile: Path, unmount_cmd, extra_env=None
    ) -> Target:
        env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
        env.update(extra_env or {})
        with open(logfile, "wb") as lf:
            proc = spawn(cmd, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf, env=env, start_new_session=True)
        t = Target(name, [mnt], daemon=proc)
        came_up = []

        def undo():
            try:
                unmount(mnt, unmount_cmd)
            finally:
                rc = stop_child(proc, grace=30)
                if rc != 0 and came_up:
                    raise BenchError(f"{name} daemon exited with status {rc} after unmount: {tail(logfile)}")

        on_cleanup(f"unmount {name} at {mnt}", undo)
        wait_mounted(mnt, fstype, proc, logfile)
        came_up.append(True)
        os.chmod(mnt, 0o755)
        return t

    def setup_mirrorfs(self, cell: Path, name: str) -> Target:
        p, m, mnt = cell / "primary", cell / "mirror", cell / "mnt"
        cmd = [str(self.mirrorfs), "mount", "-f", "-o", "create,allow_other", f"{p}|{m}", str(mnt)]
        env = {"MIRRORFS_URING": "0"} if name == "mirrorfs-devfuse" else {}
        t = self._fuse_daemon(
            name, "fuse.mirrorfs", cmd, mnt, cell / "mirrorfs.log", [str(self.mirrorfs), "unmount", str(mnt)], env
        )
        out = run([str(self.mirrorfs), "status", "--json", str(mnt)], check=False)
        try:
            transport = json.loads(out.stdout).get("transport")
        except ValueError:
            transport = None
        want = "/dev/fuse" if name == "mirrorfs-devfuse" else "io_uring"
        if transport != want:
            raise BenchError(f"{name} serves through {transport!r}, not {want}")
        return t

    def setup_mergerfs(self, cell: Path) -> Target:
        branch, mnt = cell / "branch", cell / "mnt"
        branch.mkdir()
        mnt.mkdir()
        cmd = ["mergerfs", "-f", "-o", self.args.mergerfs_opts, str(branch), str(mnt)]
        return self._fuse_daemon("mergerfs", "fuse.mergerfs", cmd, mnt, cell / "mergerfs.log", None)

    def setup_btrfs(self, cell: Path) -> Target:
        mnt = cell / "mnt"
        mnt.mkdir()
        loops = []
        for i in range(2):
            img = cell / f"disk{i}.img"
            with open(img, "wb") as f:
                f.truncate(self.cfg["btrfs_image"])
            dev = run(["losetup", "--find", "--show", "--direct-io=on", str(img)]).stdout.strip()
            if not dev.startswith("/dev/loop"):
                raise BenchError(f"losetup gave {dev!r}")
            on_cleanup(f"losetup -d {dev}", lambda dev=dev: run(["losetup", "-d", dev], timeout=60))
            loops.append(dev)
        run(["mkfs.btrfs", "-f", "-q", "-d", "raid1", "-m", "raid1", *loops], timeout=120)
        on_cleanup(f"umount btrfs {mnt}", lambda: unmount(mnt))
        run(["mount", "-t", "btrfs", "-o", ",".join(f"device={d}" for d in loops), loops[0], str(mnt)], timeout=120)
        os.chmod(mnt, 0o755)
        return Target("btrfs-raid1", [mnt])

    # ---- fio

    def fio(self, jobs: list[dict], common: dict, timeout: float = 900) -> list[dict]:
        cmd = ["fio", "--output-format=json", "--ioengine=psync", "--fallocate=none"]
        cmd += [f"--{k}={v}" for k, v in common.items()]
        for i, job in enumerate(jobs):
            cmd.append(f"--name=job{i}")
            cmd += [f"--{k}={v}" for k, v in job.items()]
        r = run(cmd, timeout=timeout)
        text = r.stdout[r.stdout.find("{") :]
        try:
            out = json.loads(text)["jobs"]
        except (ValueError, KeyError) as e:
            raise BenchError(f"fio output not understood ({e}): {r.stdout[-500:]} {r.stderr[-500:]}")
        for j in out:
            if j.get("error"):
                raise BenchError(f"fio job {j.get('jobname')} error {j['error']}: {r.stderr[-500:]}")
        return out

    @staticmethod
    def fio_path(p: Path) -> str:
        return str(p).replace(":", "\\:")

    def fio_prep(self, t: Target, name: str, size: int) -> list[str]:
        """Writes `name` of `size` in each root and fsyncs it (untimed)."""
        files = [self.fio_path(r / name) for r in t.roots]
        self.fio([dict(filename=f) for f in files], dict(rw="write", bs="1M", size=size, end_fsync=1))
        return files

    def wl_seqwrite(self, t: Target) -> dict:
        files = [self.fio_path(r / "seqwrite.dat") for r in t.roots]
        jobs = self.fio([dict(filename=f) for f in files], dict(rw="write", bs="1M", size=self.cfg["seq_size"], end_fsync=1))
        # fio's runtime includes the end fsync. Dual: the slower copy.
        return {"seqwrite": min(j["write"]["bw_bytes"] for j in jobs) / 1e6}

    def wl_randwrite(self, t: Target) -> dict:
        files = self.fio_prep(t, "randwrite.dat", self.cfg["rw_size"])
        probe = CostProbe(t)
        jobs = self.fio(
            [dict(filename=f) for f in files],
            dict(rw="randwrite", bs="4k", size=self.cfg["rw_size"], fsync=1, time_based=1, runtime=self.cfg["rw_time"]),
        )
        # One operation is one write and its fsync, on every root: for
        # dual-native, a pair of them (what one mirrored write costs natively).
        cost = probe.per_op("randwrite", sum(j["write"]["total_ios"] for j in jobs) / len(t.roots))
        return {"randwrite": min(j["write"]["iops"] for j in jobs), **cost}

    def wl_seqread(self, t: Target) -> dict:
        files = self.fio_prep(t, "seqread.dat", self.cfg["seq_size"])
        drop_caches()
        jobs = self.fio(
            [dict(filename=f) for f in files], dict(rw="read", bs="1M", size=self.cfg["seq_size"], invalidate=1)
        )
        return {"seqread": min(j["read"]["bw_bytes"] for j in jobs) / 1e6}

    def wl_randread(self, t: Target) -> dict:
        files = self.fio_prep(t, "randread.dat", self.cfg["rr_size"])
        # Warm-up: pre_read reads the file once (its own open), then the ramp
        # lets a filesystem that drops its cache on open (mergerfs
        # cache.files=partial) fill it again inside the measuring open; fio's
        # random map makes the first pass touch every block.
        jobs = self.fio(
            [dict(filename=f) for f in files],
            dict(
                rw="randread",
                bs="4k",
                size=self.cfg["rr_size"],
                invalidate=0,
                pre_read=1,
                ramp_time=self.cfg["rr_ramp"],
                time_based=1,
                runtime=self.cfg["rr_time"],
            ),
        )
        return {"randread": min(j["read"]["iops"] for j in jobs)}

    # ---- metadata (the C helper meta.c)

    def meta_phases(self, t: Target, n: int, phases: list[str], before=None, after=None) -> dict[str, float]:
        """Runs the helper in each root, phase by phase in lockstep; returns the
        slowest root's seconds per phase. `before(phase)` and `after(phase)`
        run around each phase."""
        procs = []
        try:
            for r in t.roots:
                p = spawn(
                    [str(self.meta_bin), str(r), str(n)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
                procs.append(p)
            for p in procs:
                expect_line(p, "ready", 300)
            secs = {}
            for ph in phases:
                if before:
                    before(ph)
                for p in procs:
                    p.stdin.write(f"{ph}\n".encode())
                    p.stdin.flush()
                times = [float(expect_line(p, ph, 1800).split()[1]) for p in procs]
                secs[ph] = max(times)
                if after:
                    after(ph)
            for p in procs:
                p.stdin.write(b"quit\n")
                p.stdin.flush()
                p.stdin.close()
                if stop_child(p, grace=60) != 0:
                    raise BenchError(f"metadata helper exited with {p.returncode}")
            return secs
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                stop_child(p, grace=5)

    def wl_metadata(self, t: Target) -> dict:
        n = self.cfg["meta_files"]
        res = {}
        if t.daemon:
            res["rss_idle"] = proc_status_kib(t.daemon.pid)["VmHWM"] / 1024
        phases = ["create", "stat", "rename", "unlink"]
        probes: dict[str, CostProbe] = {}
        costs: dict[str, float] = {}

        def before(ph: str) -> None:
            probes[ph] = CostProbe(t)

        def after(ph: str) -> None:
            if ph in ("create", "stat"):
                costs.update(probes[ph].per_op(ph, n))

        secs = self.meta_phases(t, n, phases, before, after)
        res.update(costs)
        for ph in phases:
            res[f"meta_{ph}"] = n / secs[ph]
        res["meta_total"] = len(phases) * n / sum(secs.values())
        if t.daemon:
            res["rss_meta"] = proc_status_kib(t.daemon.pid)["VmHWM"] / 1024
        return res

    def wl_memory(self, t: Target) -> dict:
        n = self.cfg["mem_files"]
        self.meta_phases(t, n, ["create", "stat"])
        st = proc_status_kib(t.daemon.pid)
        return {"rss_mem_hwm": st["VmHWM"] / 1024, "rss_mem_rss": st["VmRSS"] / 1024}

    # ---- PostgreSQL

    def wl_pgbench(self, t: Target) -> dict:
        pw = pwd.getpwnam("postgres")
        env = pg_env()
        scale, secs = self.cfg["pg_scale"], self.cfg["pg_time"]
        servers = []
        for r in t.roots:
            data = r / "pgdata"
            data.mkdir()
            os.chown(data, pw.pw_uid, pw.pw_gid)
            os.chmod(data, 0o700)
            sock = Path(tempfile.mkdtemp(prefix="mfsb-pg.", dir="/tmp"))
            os.chmod(sock, 0o777)
            on_cleanup(f"remove {sock}", lambda sock=sock: shutil.rmtree(sock, ignore_errors=True))
            servers.append((data, sock, free_port()))
        tmo = 1800
        jobs = run_together(
            [Job(as_postgres("initdb", "-A", "trust", "-U", "postgres", "-D", str(d)), env=env, cwd="/") for d, _, _ in servers],
            self.workdir,
            tmo,
        )
        check_jobs(jobs, "initdb")
        for data, sock, port in servers:
            logf = sock / "postgres.log"
            o = f"-k {sock} -p {port} -c listen_addresses=''"

            def stop(data=data, logf=logf):
                pidfile = data / "postmaster.pid"
                if not pidfile.exists():
                    return
                r = run(as_postgres("pg_ctl", "-D", str(data), "stop", "-m", "fast", "-w", "-t", "120"), check=False, env=env, cwd="/", timeout=180)
                if r.returncode != 0:
                    run(as_postgres("pg_ctl", "-D", str(data), "stop", "-m", "immediate", "-w", "-t", "60"), check=False, env=env, cwd="/", timeout=120)
                if pidfile.exists():
                    raise BenchError(f"postgres on {data} did not stop: {tail(logf)}")

            on_cleanup(f"stop postgres {data}", stop)
            r = run(
                as_postgres("pg_ctl", "-D", str(data), "-l", str(logf), "-o", o, "-w", "-t", "120", "start"),
                check=False,
                env=env,
                cwd="/",
                timeout=180,
            )
            if r.returncode != 0:
                raise BenchError(f"pg_ctl start on {t.name} failed: {r.stdout}{r.stderr} {tail(logf)}")

        def bench_cmds(*args):
            return [
                Job(as_postgres("pgbench", "-h", str(sock), "-p", str(port), *args, "postgres"), env=env, cwd="/")
                for _, sock, port in servers
            ]

        check_jobs(run_together(bench_cmds("-i", "-q", "-s", str(scale)), self.workdir, tmo), "pgbench -i")
        jobs = run_together(bench_cmds("-c", "4", "-j", "2", "-T", str(secs)), self.workdir, secs + tmo)
        check_jobs(jobs, "pgbench")
        tps = []
        for j in jobs:
            m = re.search(r"^tps = ([0-9.]+)", j.out, re.M)
            f = re.search(r"number of failed transactions: (\d+)", j.out)
            if not m:
                raise BenchError(f"no tps in pgbench output: {j.out[-1000:]}")
            if f and int(f.group(1)) != 0:
                raise BenchError(f"pgbench reported failed transactions: {j.out[-1000:]}")
            tps.append(float(m.group(1)))
        return {"pgbench": min(tps)}

    # ---- SQLite

    def sqlite_script(self, mode: str) -> Path:
        if mode not in self.sqlite_scripts:
            n = self.cfg["sqlite_txns"]
            path = self.workdir / f"sqlite-{mode}.sql"
            with open(path, "w") as f:
                f.write(
                    f"PRAGMA journal_mode={mode};\nPRAGMA synchronous=FULL;\n"
                    "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL, n INTEGER NOT NULL);\n"
                    "CREATE INDEX t_v ON t(v);\n"
                )
                for i in range(n):
                    f.write(f"INSERT INTO t(v, n) VALUES('row-{i:05}-{'x' * (i % 97)}', {i});\n")
            self.sqlite_scripts[mode] = path
        return self.sqlite_scripts[mode]

    def sqlite(self, t: Target, mode: str) -> float:
        n = self.cfg["sqlite_txns"]
        script = self.sqlite_script(mode)
        jobs = run_together(
            [Job(["sqlite3", "-batch", "-bail", str(r / "bench.db")], stdin=script) for r in t.roots],
            self.workdir,
            3600,
        )
        check_jobs(jobs, f"sqlite3 ({mode})")
        for j in jobs:
            if j.out.strip() != mode.lower() or j.err.strip():
                raise BenchError(f"sqlite3 ({mode}) said: {j.out.strip()[:200]} {j.err.strip()[:500]}")
        # Dual: both copies did all n transactions; the slower one sets the rate.
        return n / max(j.secs for j in jobs)

    def wl_sqlite_journal(self, t: Target) -> dict:
        return {"sqlite_journal": self.sqlite(t, "DELETE")}

    def wl_sqlite_wal(self, t: Target) -> dict:
        return {"sqlite_wal": self.sqlite(t, "WAL")}


def expect_line(p: subprocess.Popen, word: str, timeout: float) -> str:
    """Reads one line from the helper's stdout; it must start with `word`."""
    fd = p.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"metadata helper: no '{word}' within {timeout:.0f} s")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 1)
            if not chunk:
                raise BenchError(f"metadata helper ended before '{word}': {buf.decode(errors='replace')}")
            buf += chunk
    line = buf.decode().strip()
    if not line.startswith(word):
        raise BenchError(f"metadata helper: {line}")
    return line


def check_jobs(jobs: list[Job], what: str) -> None:
    for j in jobs:
        if j.rc != 0:
            raise BenchError(f"{what} exited {j.rc}: {(j.err + j.out).strip()[-1500:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ metrics


@dataclass
class Metric:
    key: str
    label: str
    unit: str
    workload: str
    write: bool  # also compared with dual-native


def metrics(cfg: dict) -> list[Metric]:
    n = cfg["meta_files"]
    return [
        Metric("seqwrite", f"seq write {hsize(cfg['seq_size'])} + fsync", "MB/s", "seqwrite", True),
        Metric("randwrite", f"rand write 4k, fsync each ({hsize(cfg['rw_size'])})", "IOPS", "randwrite", True),
        Metric("seqread", f"seq read {hsize(cfg['seq_size'])}, cold", "MB/s", "seqread", False),
        Metric("randread", f"rand read 4k, cached ({hsize(cfg['rr_size'])})", "IOPS", "randread", False),
        Metric("meta_create", f"create {n:,} files", "ops/s", "metadata", True),
        Metric("meta_stat", f"stat {n:,} files", "ops/s", "metadata", False),
        Metric("meta_rename", f"rename {n:,} files", "ops/s", "metadata", True),
        Metric("meta_unlink", f"unlink {n:,} files", "ops/s", "metadata", True),
        Metric("meta_total", "metadata, all 4 phases", "ops/s", "metadata", True),
        Metric("pgbench", f"pgbench -c4 -j2 s={cfg['pg_scale']} {cfg['pg_time']}s", "TPS", "pgbench", True),
        Metric("sqlite_journal", f"sqlite {cfg['sqlite_txns']:,} tx, DELETE", "tx/s", "sqlite-journal", True),
        Metric("sqlite_wal", f"sqlite {cfg['sqlite_txns']:,} tx, WAL", "tx/s", "sqlite-wal", True),
    ]


def memory_metrics(cfg: dict) -> list[Metric]:
    return [
        Metric("rss_idle", "VmHWM after mount, idle", "MiB", "metadata", False),
        Metric("rss_meta", f"VmHWM, metadata {cfg['meta_files']:,} files", "MiB", "metadata", False),
        Metric("rss_mem_hwm", f"VmHWM, {cfg['mem_files']:,} files created+stat'ed", "MiB", "memory", False),
        Metric("rss_mem_rss", f"VmRSS, {cfg['mem_files']:,} files created+stat'ed", "MiB", "memory", False),
    ]


def cost_metrics() -> list[Metric]:
    return [
        Metric("cs_randwrite", "switches per fsync'd 4k write", "", "randwrite", False),
        Metric("cpu_randwrite", "daemon CPU per fsync'd 4k write", "us", "randwrite", False),
        Metric("cs_create", "switches per create", "", "metadata", False),
        Metric("cpu_create", "daemon CPU per create", "us", "metadata", False),
        Metric("cs_stat", "switches per stat", "", "metadata", False),
        Metric("cpu_stat", "daemon CPU per stat", "us", "metadata", False),
    ]


def applies(workload: str, target: str) -> bool:
    if workload == "memory":
        return target in FUSE_TARGETS
    if workload in READ_WORKLOADS and target == "dual-native":
        return False
    return True


# ------------------------------------------------------------------ report


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = []
    for k, r in enumerate([header] + rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summarize(samples: dict, errors: list[dict], mets: list[Metric], targets: list[str]) -> dict:
    res = {}
    failed = {(e["target"], e["workload"]) for e in errors}
    for m in mets:
        row = {}
        for t in targets:
            vals = samples.get(t, {}).get(m.key, [])
            if vals:
                med = statistics.median(vals)
                row[t] = dict(
                    median=med,
                    samples=vals,
                    spread=(max(vals) - min(vals)) / 2 / med if med else 0.0,
                )
            elif (t, m.workload) in failed:
                row[t] = dict(median=None, samples=[], error=True)
        res[m.key] = row
    return res


def cell_text(r: dict | None, show_spread: bool) -> str:
    if r is None:
        return "-"
    if r.get("error"):
        return "FAILED"
    s = fmt(r["median"])
    if show_spread and len(r["samples"]) > 1:
        s += f" ±{r['spread'] * 100:.0f}%"
    return s


def render(
    summary: dict, mets: list[Metric], mem: list[Metric], cost: list[Metric], targets: list[str], reps: int
) -> str:
    out = []
    used = [m for m in mets if summary.get(m.key)]
    if used:
        out.append(
            f"Absolute figures, median of {reps} repetition(s)"
            + (" (± half the range, as % of the median)" if reps > 1 else "")
            + "; higher is better:"
        )
        rows = [[m.label, m.unit] + [cell_text(summary[m.key].get(t), True) for t in targets] for m in used]
        out.append(table(["workload", "unit"] + targets, rows))

    def ratio(m: Metric, t: str, ref: str) -> str:
        a, b = summary[m.key].get(t), summary[m.key].get(ref)
        if not a or not b or a.get("error") or b.get("error") or not b["median"]:
            return "-"
        return f"{a['median'] / b['median']:.2f}"

    if "native" in targets and used:
        others = [t for t in targets if t != "native"]
        if others:
            out.append("\nRatio to native (target median / native median):")
            rows = [[m.label] + [ratio(m, t, "native") for t in others] for m in used]
            out.append(table(["workload"] + others, rows))
    if "dual-native" in targets:
        wr = [m for m in used if m.write]
        others = [t for t in targets if t != "dual-native"]
        if wr and others:
            out.append("\nRatio to dual-native, writes (the same job on two plain directories at once):")
            rows = [[m.label] + [ratio(m, t, "dual-native") for t in others] for m in wr]
            out.append(table(["workload"] + others, rows))
    mused = [m for m in mem if summary.get(m.key)]
    fuse = [t for t in targets if t in FUSE_TARGETS]
    if mused and fuse:
        out.append("\nFUSE daemon memory (MiB, from /proc/PID/status; lower is better):")
        rows = [[m.label] + [cell_text(summary[m.key].get(t), False) for t in fuse] for m in mused]
        out.append(table(["daemon"] + fuse, rows))
    cused = [m for m in cost if summary.get(m.key)]
    probed = [t for t in targets if t in FUSE_TARGETS or t in ("native", "dual-native")]
    if cused and probed:
        out.append(
            "\nCost per operation, median (context switches on every CPU; FUSE daemon CPU time, all threads;"
            " dual-native: the operation on both directories; lower is better):"
        )
        rows = [[m.label, m.unit] + [cell_text(summary[m.key].get(t), False) for t in probed] for m in cused]
        out.append(table(["cost", "unit"] + probed, rows))
    return "\n".join(out)


# ------------------------------------------------------------------ machine


def first_line(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return ((r.stdout or r.stderr).strip().splitlines() or [""])[0]
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine(workdir: Path) -> dict:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    dev = os.stat(workdir).st_dev
    majmin = f"{os.major(dev)}:{os.minor(dev)}"
    fs = {}
    for m in mountinfo():
        if m["majmin"] == majmin and (str(workdir) + "/").startswith(m["mountpoint"].rstrip("/") + "/"):
            if len(m["mountpoint"]) >= len(fs.get("mountpoint", "")):
                fs = m
    rot = Path(f"/sys/dev/block/{majmin}/queue/rotational")
    if not rot.exists():
        rot = Path(f"/sys/dev/block/{majmin}/../queue/rotational")
    osname = ""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                osname = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return dict(
        cpu=cpu,
        cores=os.cpu_count(),
        usable_cores=len(os.sched_getaffinity(0)),
        memory_bytes=mem,
        kernel=os.uname().release,
        os=osname,
        virtualization=first_line(["systemd-detect-virt"]) if shutil.which("systemd-detect-virt") else "",
        workdir=str(workdir),
        workdir_fs=dict(
            fstype=fs.get("fstype", "?"),
            source=fs.get("source", "?"),
            mountpoint=fs.get("mountpoint", "?"),
            options=fs.get("options", "") + ("; " + fs["superopts"] if fs.get("superopts") else ""),
            rotational=rot.read_text().strip() if rot.exists() else "?",
        ),
    )


def versions(mirrorfs_bin: Path, from_repo: bool) -> dict:
    """Tool versions; the mirrorfs commit is the repository's when the binary
    is the one built from it (a --mirrorfs binary may come from anywhere)."""
    commit = "unknown (binary given with --mirrorfs)"
    if from_repo:
        git = ["git", "-c", f"safe.directory={REPO}", "-C", str(REPO)]
        commit = first_line(git + ["rev-parse", "--short=12", "HEAD"]) or "unknown"
        st = subprocess.run(
            git + ["status", "--porcelain", "--untracked-files=no", "--", "src", "Cargo.toml", "Cargo.lock", "build.rs"],
            capture_output=True,
            text=True,
        )
        if st.stdout.strip():
            commit += "+uncommitted changes"
    return dict(
        mirrorfs_commit=commit,
        mirrorfs_bin=str(mirrorfs_bin),
        fio=first_line(["fio", "--version"]),
        mergerfs=first_line(["mergerfs", "--version"]),
        btrfs_progs=first_line(["mkfs.btrfs", "--version"]),
        postgres=first_line([str(PG_BIN / "postgres"), "--version"]),
        sqlite=first_line(["sqlite3", "--version"]).split(" ")[0],
    )


def describe(mach: dict, vers: dict) -> str:
    fs = mach["workdir_fs"]
    return "\n".join(
        [
            f"CPU:     {mach['cpu']}, {mach['cores']} cores ({mach['usable_cores']} usable)",
            f"Memory:  {mach['memory_bytes'] / GIB:.1f} GiB",
            f"Kernel:  {mach['kernel']} ({mach['os']}{', ' + mach['virtualization'] if mach['virtualization'] else ''})",
            f"Workdir: {mach['workdir']} on {fs['fstype']} {fs['source']} (mounted at {fs['mountpoint']}, "
            f"rotational={fs['rotational']}, {fs['options']})",
            f"mirrorfs {vers['mirrorfs_commit']}; {vers['fio']}; mergerfs {vers['mergerfs'].split()[-1] if vers['mergerfs'] else '?'}; "
            f"{vers['btrfs_progs']}; {vers['postgres']}; sqlite {vers['sqlite']}",
        ]
    )


# ------------------------------------------------------------------ preflight


def find_cargo() -> str | None:
    c = shutil.which("cargo")
    if c:
        return c
    homes = [os.environ.get("CARGO_HOME", ""), os.path.expanduser("~/.cargo")]
    if os.environ.get("SUDO_USER"):
        try:
            homes.append(os.path.join(pwd.getpwnam(os.environ["SUDO_USER"]).pw_dir, ".cargo"))
        except KeyError:
            pass
    for h in homes:
        if h and os.access(os.path.join(h, "bin", "cargo"), os.X_OK):
            return os.path.join(h, "bin", "cargo")
    return None


def preflight(targets: list[str], workloads: list[str], need_build: bool, mirrorfs_bin: Path | None) -> list[str]:
    """Everything the selection needs that is missing, as readable lines."""
    missing = []

    def tool(name: str, pkg: str, why: str):
        if not shutil.which(name):
            missing.append(f"{name} (apt-get install -y {pkg}), needed for {why}")

    if os.geteuid() != 0:
        missing.append("root: run with sudo (mounts, loop devices, drop_caches, chown to postgres)")
    if need_build and not find_cargo():
        missing.append("cargo (rustup.rs), needed to build mirrorfs; or pass --no-build/--mirrorfs BIN")
    if not need_build and MIRRORFS_TARGETS & set(targets) and mirrorfs_bin and not os.access(mirrorfs_bin, os.X_OK):
        missing.append(f"{mirrorfs_bin}: no mirrorfs binary there (build it, or drop --no-build)")
    if FUSE_TARGETS & set(targets) and not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse (modprobe fuse; in a container pass --device /dev/fuse), needed for mirrorfs/mergerfs")
    if "mergerfs" in targets:
        tool("mergerfs", "mergerfs", "target mergerfs")
    if "btrfs-raid1" in targets:
        tool("mkfs.btrfs", "btrfs-progs", "target btrfs-raid1")
        tool("losetup", "mount", "target btrfs-raid1")
        fs = Path("/proc/filesystems").read_text()
        if "btrfs" not in fs and not list(Path("/lib/modules", os.uname().release).glob("**/btrfs.ko*")):
            missing.append("btrfs kernel support (not in /proc/filesystems, no module), needed for target btrfs-raid1")
    if {"seqwrite", "randwrite", "seqread", "randread"} & set(workloads):
        tool("fio", "fio", "the fio workloads")
    if {"metadata", "memory"} & set(workloads):
        tool("cc", "build-essential", "the metadata helper (tests/bench/meta.c)")
    if "pgbench" in workloads:
        for b in ("initdb", "pg_ctl", "postgres", "pgbench"):
            if not os.access(PG_BIN / b, os.X_OK):
                missing.append(f"{PG_BIN / b} (apt-get install -y postgresql-15), needed for pgbench")
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            missing.append("user postgres (created by postgresql-15), needed for pgbench")
        tool("setpriv", "util-linux", "pgbench (runs PostgreSQL as postgres)")
    if {"sqlite-journal", "sqlite-wal"} & set(workloads):
        tool("sqlite3", "sqlite3", "the sqlite workloads")
    if "seqread" in workloads and not os.access("/proc/sys/vm/drop_caches", os.W_OK) and os.geteuid() == 0:
        missing.append("a writable /proc/sys/vm/drop_caches, needed for the cold read")
    return missing


def parse_list(s: str, allowed: list[str], aliases: dict, what: str) -> list[str]:
    want = []
    for w in s.split(","):
        w = w.strip()
        if not w:
            continue
        for x in aliases.get(w, [w]):
            if x not in allowed:
                raise SystemExit(f"bench.py: unknown {what} {x!r}; choose from {', '.join(allowed + list(aliases))}")
            if x not in want:
                want.append(x)
    return [x for x in allowed if x in want]  # canonical order


# ------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(
        description="Benchmark mirrorfs against native, dual-native, btrfs RAID1 and mergerfs (needs root).",
        epilog="Exit status: 0 every selected target and workload ran; 1 something could not be set up or failed "
        "(reported, the rest still runs); 2 usage error.",
    )
    ap.add_argument("--quick", action="store_true", help="small sizes, one repetition: under 5 minutes")
    ap.add_argument("--targets", default=",".join(ALL_TARGETS), help=f"comma list (default all: {','.join(ALL_TARGETS)})")
    ap.add_argument(
        "--workloads",
        default="all",
        help=f"comma list of {','.join(ALL_WORKLOADS)}; aliases fio, sqlite, all (default all)",
    )
    ap.add_argument("--reps", type=int, help="repetitions (default 3, quick 1)")
    ap.add_argument("--dir", default="/var/tmp", help="make the work directory in DIR (default /var/tmp)")
    ap.add_argument("--json", help="write results here (default $CARGO_TARGET_DIR or target/, bench/bench-results.json)")
    ap.add_argument("--no-build", action="store_true", help="skip `cargo build --release`; use the built binary")
    ap.add_argument("--mirrorfs", help="use this mirrorfs binary (implies --no-build)")
    ap.add_argument("--mergerfs-opts", default=MERGERFS_OPTS, help=f"mergerfs -o options (default {MERGERFS_OPTS})")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (everything is still unmounted)")
    args = ap.parse_args()
    # sudo's secure_path has these, a root login shell may not; the tools live there.
    path = os.environ.get("PATH", "").split(":")
    os.environ["PATH"] = ":".join(path + [d for d in ("/usr/local/sbin", "/usr/sbin", "/sbin") if d not in path])

    cfg = dict(PROFILES["quick" if args.quick else "full"])
    if args.reps is not None:
        if args.reps < 1:
            ap.error("--reps must be at least 1")
        cfg["reps"] = args.reps
    targets = parse_list(args.targets, ALL_TARGETS, {"all": ALL_TARGETS}, "target")
    workloads = parse_list(args.workloads, ALL_WORKLOADS, WORKLOAD_ALIASES, "workload")
    if not targets or not workloads:
        ap.error("no target or no workload selected")

    target_dir = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target").absolute()
    need_build = not (args.no_build or args.mirrorfs)
    mirrorfs_bin = Path(args.mirrorfs).absolute() if args.mirrorfs else target_dir / "release" / "mirrorfs"
    json_path = Path(args.json).absolute() if args.json else target_dir / "bench" / "bench-results.json"

    missing = preflight(targets, workloads, need_build, mirrorfs_bin if MIRRORFS_TARGETS & set(targets) else None)
    if missing:
        print("bench.py: cannot run the selected targets and workloads; missing:", file=sys.stderr)
        for m in missing:
            print(f"  - {m}", file=sys.stderr)
        print("(.ci/install.sh installs all of them; or deselect with --targets/--workloads)", file=sys.stderr)
        return 1

    if "mirrorfs" in targets and URING_SWITCH.exists() and URING_SWITCH.read_text().strip() != "Y":
        log(f"turning FUSE over io_uring on ({URING_SWITCH})")
        URING_SWITCH.write_text("Y\n")
    if need_build and MIRRORFS_TARGETS & set(targets):
        log(f"cargo build --release (target dir {target_dir})")
        r = subprocess.run([find_cargo(), "build", "--release"], cwd=REPO)
        if r.returncode != 0:
            print("bench.py: cargo build --release failed", file=sys.stderr)
            return 1

    parent = Path(args.dir).absolute()
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < cfg["min_free"]:
        print(f"bench.py: {parent} has {free / GIB:.1f} GiB free; this run needs {cfg['min_free'] / GIB:.0f} GiB", file=sys.stderr)
        return 1

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    atexit.register(cleanup_all)
    workdir = Path(tempfile.mkdtemp(prefix="mirrorfs-bench.", dir=parent))
    os.chmod(workdir, 0o755)  # postgres must reach its data directory

    def remove_workdir():
        left = mounts_under(workdir)
        if left:
            raise BenchError(f"not removing {workdir}: still mounted: {left}")
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir)

    on_cleanup(f"remove {workdir}", remove_workdir)
    started = dt.datetime.now(dt.timezone.utc)
    try:
        return run_all(args, cfg, targets, workloads, workdir, mirrorfs_bin, json_path, started)
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    finally:
        cleanup_all()


def run_all(args, cfg, targets, workloads, workdir, mirrorfs_bin, json_path, started) -> int:
    mach = machine(workdir)
    vers = versions(mirrorfs_bin, not args.mirrorfs)
    mode = "quick" if args.quick else "full"
    print(f"mirrorfs benchmark ({mode} mode, {cfg['reps']} repetition(s)), {started:%Y-%m-%d %H:%M} UTC")
    print(describe(mach, vers))
    print(f"Targets: {', '.join(targets)}; workloads: {', '.join(workloads)}\n", flush=True)

    meta_bin = None
    if {"metadata", "memory"} & set(workloads):
        meta_bin = workdir / "meta"
        run(["cc", "-O2", "-Wall", "-o", str(meta_bin), str(HERE / "meta.c")])
    bench = Bench(args, cfg, workdir, mirrorfs_bin, meta_bin)
    mets, mems, costs = metrics(cfg), memory_metrics(cfg), cost_metrics()
    units = {m.key: m.unit for m in mets + mems + costs}
    samples: dict[str, dict[str, list[float]]] = {t: {} for t in targets}
    errors: list[dict] = []
    cells = workdir / "cells"
    cells.mkdir()
    order_log = []

    for rep in range(cfg["reps"]):
        # Rotate the target order each repetition, so that no target always
        # runs right after a given other one.
        k = rep % len(targets)
        order = targets[k:] + targets[:k]
        for wl in workloads:
            if wl == "memory" and rep > 0:
                continue  # once is enough: peak RSS is not noisy
            for tname in order:
                if not applies(wl, tname):
                    continue
                cell = cells / f"{rep}-{wl}-{tname}"
                order_log.append(f"{rep}/{wl}/{tname}")
                t0 = time.monotonic()
                res: dict = {}
                err = None
                try:
                    with Scope() as scope:
                        t = bench.setup(tname, cell)
                        res = getattr(bench, "wl_" + wl.replace("-", "_"))(t)
                except BenchError as e:
                    err = str(e)
                except Exception as e:  # noqa: BLE001 - one cell's bug must not end the run
                    err = f"{type(e).__name__}: {e}"
                    traceback.print_exc()
                if err is None and scope.errors:
                    err = "; ".join(scope.errors)
                if cell.exists():
                    left = mounts_under(cell)
                    if left:
                        raise SystemExit(f"bench.py: still mounted after teardown: {left}")
                    shutil.rmtree(cell, ignore_errors=True)
                # Write back this cell's deletions (and, on a filesystem
                # mounted with discard, their discards) now, not inside the
                # next cell's measurement.
                os.sync()
                secs = time.monotonic() - t0
                if err:
                    errors.append(dict(rep=rep, workload=wl, target=tname, error=err))
                    log(f"rep {rep + 1}/{cfg['reps']} {wl:<14} {tname:<12} FAILED ({secs:.1f} s): {err}")
                    continue
                for key, v in res.items():
                    samples[tname].setdefault(key, []).append(v)
                shown = ", ".join(f"{key} {fmt(v)} {units[key]}" for key, v in res.items())
                log(f"rep {rep + 1}/{cfg['reps']} {wl:<14} {tname:<12} {shown} ({secs:.1f} s)")

    summary = summarize(samples, errors, mets + mems + costs, targets)
    text = render(summary, mets, mems, costs, targets, cfg["reps"])
    duration = time.monotonic() - T0
    print(text)
    print(f"\nTotal time {duration / 60:.1f} min.")
    if errors:
        print(f"\n{len(errors)} cell(s) FAILED:")
        for e in errors:
            print(f"  rep {e['rep'] + 1} {e['workload']} on {e['target']}: {e['error'][:2000]}")

    ratios = {"native": {}, "dual-native": {}}
    for m in mets:
        for ref in ratios:
            if ref == "dual-native" and not m.write:
                continue
            b = summary.get(m.key, {}).get(ref)
            if not b or not b.get("median"):
                continue
            ratios[ref][m.key] = {
                t: r["median"] / b["median"] for t, r in summary[m.key].items() if r.get("median") is not None and t != ref
            }
    doc = dict(
        schema=1,
        command=sys.argv,
        mode=mode,
        started=started.isoformat(timespec="seconds"),
        duration_s=round(duration, 1),
        machine=mach,
        versions=vers,
        config=dict(cfg, targets=targets, workloads=workloads, mergerfs_opts=args.mergerfs_opts, order=order_log),
        metrics=[
            dict(key=m.key, label=m.label, unit=m.unit, workload=m.workload, write=m.write) for m in mets + mems + costs
        ],
        results=summary,
        ratios=ratios,
        errors=errors,
        table=text,
    )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"JSON: {json_path}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
