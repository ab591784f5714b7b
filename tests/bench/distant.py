#!/usr/bin/env python3
"""A mirror over a 10 ms link: sync, async and mirrors=off, side by side.

The mirror is sshfs over loopback to a private sshd, through a relay that
holds every chunk DELAY each way (this kernel has no netem). The primary is
a local directory. Each mode gets the same fresh pair (a PostgreSQL cluster
made with initdb and pgbench -i before the mount, copied to both sides) and
runs, interleaved, REPS times:

- pgbench -c 4 -j 2 -T SECS through the mount: TPS, and in async mode the
  lag (`mirrorfs status --json`, sampled every 0.2 s) and the time to drain
  after the load;
- fsync'd 4 KiB writes (pwrite at a random offset of a 4 MiB file, then
  fdatasync), one writer: latency p50 and p99, and the daemon's CPU time
  per write;
- at the end, `mirrorfs verify` of the pair: the sides are identical.

Ratios are against mirrors=off on the same primary in the same run, so the
machine's noise moves both. The issue's must: async TPS >= 0.8 x off.

    python3 tests/bench/distant.py [--quick] [--mirrorfs BIN] [--json F]
"""

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402 - the shared process, mount and cleanup helpers

MODES = ["off", "async", "sync"]
OPTIONS = {"off": "mirrors=off", "async": "async", "sync": ""}


# ------------------------------------------------------------------ the link


def relay(target_port: int, delay: float) -> int:
    """A TCP relay on 127.0.0.1 to `target_port` that holds every chunk
    `delay` seconds each way without limiting the rate; returns its port."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    B.on_cleanup("relay listener", lsock.close)

    def pump(src: socket.socket, dst: socket.socket) -> None:
        cond = threading.Condition()
        queue: list[tuple[float, bytes]] = []

        def sender() -> None:
            while True:
                with cond:
                    while not queue:
                        cond.wait()
                    due, data = queue.pop(0)
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                try:
                    dst.sendall(data)
                except OSError:
                    return

        threading.Thread(target=sender, daemon=True).start()
        while True:
            try:
                data = src.recv(1 << 16)
            except OSError:
                data = b""
            with cond:
                queue.append((time.monotonic() + delay, data))
                cond.notify()
            if not data:
                return

    def accept() -> None:
        while True:
            try:
                client, _ = lsock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", target_port))
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=pump, args=(client, server), daemon=True).start()
            threading.Thread(target=pump, args=(server, client), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return lsock.getsockname()[1]


def sshfs(work: Path, delay: float) -> tuple[Path, Path]:
    """sshd on loopback and an sshfs of `work/remote` through the relay;
    returns (mountpoint, the directory it serves)."""
    remote, root = work / "remote", work / "fs"
    remote.mkdir()
    root.mkdir()
    # The far machine's disk is not the primary's: the served directory is
    # a tmpfs of its own, so that the mirror's flushes do not queue behind
    # (and in front of) the primary's on the one disk this machine has.
    B.run(["mount", "-t", "tmpfs", "-o", "size=8g,mode=0755", "mirrorfs-distant-remote", str(remote)])
    B.on_cleanup("remote tmpfs", lambda: B.unmount(remote))
    os.makedirs("/run/sshd", exist_ok=True)
    for key in ("host_key", "client_key"):
        B.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mirrorfs-bench", "-f", str(work / key)])
    shutil.copy(work / "client_key.pub", work / "authorized_keys")
    port = B.free_port()
    (work / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {work}/host_key\n"
        f"AuthorizedKeysFile {work}/authorized_keys\nPermitRootLogin prohibit-password\n"
        "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\nPidFile none\nSubsystem sftp internal-sftp\nLogLevel ERROR\n"
    )
    sshd_log = open(work / "sshd.log", "w")
    sshd = B.spawn(["/usr/sbin/sshd", "-D", "-e", "-f", str(work / "sshd_config")], stdout=sshd_log, stderr=sshd_log)
    B.on_cleanup("sshd", lambda: (sshd.terminate(), B.stop_child(sshd)))
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            break
        except OSError:
            if time.monotonic() > deadline or sshd.poll() is not None:
                raise B.BenchError(f"sshd did not start: {B.tail(work / 'sshd.log')}")
            time.sleep(0.02)
    via = relay(port, delay)
    opts = (
        "StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes,IdentitiesOnly=yes,"
        f"IdentityFile={work}/client_key,port={via},LogLevel=ERROR,allow_other"
    )
    sshfs_log = open(work / "sshfs.log", "w")
    p = B.spawn(
        ["sshfs", "-f", "-F", "/dev/null", "-o", opts, f"root@127.0.0.1:{remote}", str(root)],
        stdout=sshfs_log,
        stderr=sshfs_log,
        stdin=B.subprocess.DEVNULL,
    )
    B.on_cleanup("sshfs", lambda: (B.unmount(root), B.stop_child(p)))
    B.wait_mounted(root, "fuse.sshfs", p, work / "sshfs.log")
    return root, remote


# ------------------------------------------------------------------ a pair


class Pair:
    """A mirrorfs mount of a local primary and a mirror over the link, both
    holding the same pgbench cluster; unmounted when the scope ends."""

    def __init__(self, binary: Path, work: Path, remote: Path, root: Path, cluster: Path, mode: str, tag: str):
        self.binary, self.mode = binary, mode
        self.primary = work / f"primary-{tag}"
        mirror_local = remote / f"mirror-{tag}"
        self.mirror = root / f"mirror-{tag}"
        self.mnt = work / f"mnt-{tag}"
        self.mnt.mkdir()
        for d in (self.primary, mirror_local):
            B.run(["cp", "-a", str(cluster), str(d)])
        opts = ",".join(o for o in ("allow_other", OPTIONS[mode]) if o)
        spec = f"{self.primary}|{self.mirror}"
        self.log = work / f"mirrorfs-{tag}.log"
        out = open(self.log, "w")
        self.proc = B.spawn(
            [str(binary), "mount", "-f", "-o", opts, spec, str(self.mnt)],
            stdout=out,
            stderr=out,
            stdin=B.subprocess.DEVNULL,
        )
        B.on_cleanup(f"mirrorfs {tag}", lambda: (B.unmount(self.mnt, [str(binary), "unmount", str(self.mnt)]), B.stop_child(self.proc)))
        B.wait_mounted(self.mnt, "fuse.mirrorfs", self.proc, self.log)

    def status(self) -> dict:
        r = B.run([str(self.binary), "status", "--json", str(self.mnt)], check=False, timeout=30)
        try:
            return json.loads(r.stdout)
        except ValueError:
            return {}


def pgbench(pair: Pair, secs: int, sock: Path) -> dict:
    """pgbench -c 4 -j 2 through the mount; TPS, and the lag while it ran."""
    port = B.free_port()
    pglog = sock / f"pg-{pair.mnt.name}.log"
    o = f"-k {sock} -p {port} -c listen_addresses=''"
    B.run(B.as_postgres("pg_ctl", "-D", str(pair.mnt), "-l", str(pglog), "-o", o, "-w", "-t", "300", "start"), env=B.pg_env())
    B.on_cleanup("postgres", lambda: B.run(B.as_postgres("pg_ctl", "-D", str(pair.mnt), "stop", "-m", "immediate"), check=False, env=B.pg_env()))
    lags: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            st = pair.status()
            if "lag_seconds" in st:
                lags.append(st["lag_seconds"])

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        r = B.run(
            B.as_postgres("pgbench", "-h", str(sock), "-p", str(port), "-c", "4", "-j", "2", "-T", str(secs), "postgres"),
            env=B.pg_env(),
            timeout=secs + 600,
        )
    finally:
        done.set()
        sampler.join()
    tps = next(float(l.split("=")[1].split()[0]) for l in r.stdout.splitlines() if l.startswith("tps ="))
    B.run(B.as_postgres("pg_ctl", "-D", str(pair.mnt), "stop", "-m", "fast", "-w", "-t", "300"), env=B.pg_env())
    t = time.monotonic()
    while pair.mode == "async" and pair.status().get("lag_ops", 0) > 0:
        if time.monotonic() - t > 600:
            raise B.BenchError(f"async: the mirror did not catch up in 600 s: {pair.status()}")
        time.sleep(0.1)
    out = dict(tps=tps, drain_s=time.monotonic() - t)
    if pair.mode == "async":
        out.update(lag_max_s=max(lags, default=0.0), lag_mean_s=statistics.fmean(lags) if lags else 0.0)
    return out


def fsync_writes(pair: Pair, n: int) -> dict:
    """n fsync'd 4 KiB writes at random offsets of a 4 MiB file."""
    path = pair.mnt / "fsync-probe"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"\0" * (4 << 20), 0)
        os.fsync(fd)
        block = os.urandom(4096)
        rng = random.Random(7)
        lat = []
        cpu0 = B.cpu_ns(pair.proc.pid)
        for _ in range(n):
            off = rng.randrange(1024) * 4096
            t = time.perf_counter()
            os.pwrite(fd, block, off)
            os.fdatasync(fd)
            lat.append(time.perf_counter() - t)
        cpu = B.cpu_ns(pair.proc.pid) - cpu0
    finally:
        os.close(fd)
    lat.sort()
    return dict(
        fsync_p50_ms=1e3 * lat[len(lat) // 2],
        fsync_p99_ms=1e3 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        cpu_us_per_write=cpu / n / 1e3,
    )


# ------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one repetition, short runs")
    ap.add_argument("--reps", type=int, help="repetitions (default 3, quick 1)")
    ap.add_argument("--secs", type=int, help="pgbench seconds (default 30, quick 10)")
    ap.add_argument("--delay-ms", type=float, default=10.0, help="link delay each way (default 10)")
    ap.add_argument("--mirrorfs", default="target/release/mirrorfs", help="the mirrorfs binary")
    ap.add_argument("--dir", default="/var/tmp", help="make the work directory in DIR")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--modes", default=",".join(MODES), help="the modes to run, of off,async,sync (default all)")
    args = ap.parse_args()
    modes = [m for m in MODES if m in args.modes.split(",")]
    if "off" not in modes or not set(args.modes.split(",")) <= set(MODES):
        print(f"distant.py: --modes takes some of {','.join(MODES)}, off among them (it is the baseline)", file=sys.stderr)
        return 2
    reps = args.reps or (1 if args.quick else 3)
    secs = args.secs or (10 if args.quick else 30)
    writes = {"off": 2000, "async": 2000, "sync": 300} if not args.quick else {"off": 500, "async": 500, "sync": 100}
    binary = Path(args.mirrorfs).resolve()
    if os.geteuid() != 0:
        print("distant.py: needs root (FUSE mounts, sshd)", file=sys.stderr)
        return 2
    B.signal.signal(B.signal.SIGTERM, B._on_signal)
    work = Path(tempfile.mkdtemp(prefix="mirrorfs-distant.", dir=args.dir))
    os.chmod(work, 0o755)
    results: dict[str, list[dict]] = {m: [] for m in modes}
    try:
        root, remote = sshfs(work, args.delay_ms / 1e3)
        B.log(f"sshfs through a {args.delay_ms:g} ms relay at {root}")
        cluster = work / "cluster"
        cluster.mkdir()
        shutil.chown(cluster, "postgres", "postgres")
        os.chmod(cluster, 0o700)
        B.run(B.as_postgres("initdb", "-k", "-A", "trust", "-U", "postgres", "-D", str(cluster)), env=B.pg_env())
        sock = work / "sock"
        sock.mkdir()
        os.chmod(sock, 0o777)
        port = B.free_port()
        o = f"-k {sock} -p {port} -c listen_addresses=''"
        B.run(B.as_postgres("pg_ctl", "-D", str(cluster), "-l", str(sock / "init.log"), "-o", o, "-w", "start"), env=B.pg_env())
        B.run(B.as_postgres("pgbench", "-h", str(sock), "-p", str(port), "-i", "-s", "10", "postgres"), env=B.pg_env())
        B.run(B.as_postgres("pg_ctl", "-D", str(cluster), "stop", "-m", "fast", "-w"), env=B.pg_env())
        for rep in range(reps):
            for mode in modes:
                tag = f"{mode}{rep}"
                with B.Scope():
                    pair = Pair(binary, work, remote, root, cluster, mode, tag)
                    r = pgbench(pair, secs, sock)
                    r.update(fsync_writes(pair, writes[mode]))
                    if mode == "async":
                        t = time.monotonic()
                        while pair.status().get("lag_ops", 0) > 0:
                            time.sleep(0.05)
                        r["fsync_drain_s"] = time.monotonic() - t
                    B.unmount(pair.mnt, [str(binary), "unmount", str(pair.mnt)])
                    B.stop_child(pair.proc)
                    if mode != "off":
                        v = B.run([str(binary), "verify", f"{pair.primary}|{pair.mirror}"], check=False, timeout=1200)
                        r["identical"] = v.returncode == 0
                        if v.returncode != 0:
                            raise B.BenchError(f"{mode}: the sides differ after the run: {v.stdout[-2000:]}")
                    results[mode].append(r)
                    B.log(f"{tag}: {json.dumps(r)}")
                shutil.rmtree(pair.primary, ignore_errors=True)
                shutil.rmtree(remote / f"mirror-{tag}", ignore_errors=True)
    finally:
        B.cleanup_all()
        shutil.rmtree(work, ignore_errors=True)

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[mode])

    off_tps = med("off", "tps")
    print(f"\nA mirror over sshfs with {args.delay_ms:g} ms each way; pgbench -c 4 -j 2 -T {secs}, scale 10; {reps} repetition(s), medians\n")
    print("| mode | pgbench TPS | × mirrors=off | fsync'd 4 KiB write p50 | p99 | daemon CPU per write |")
    print("|---|---|---|---|---|---|")
    for mode in modes:
        print(
            f"| {mode} | {med(mode, 'tps'):,.0f} | {med(mode, 'tps') / off_tps:.2f} | "
            f"{med(mode, 'fsync_p50_ms'):.2f} ms | {med(mode, 'fsync_p99_ms'):.2f} ms | {med(mode, 'cpu_us_per_write'):.0f} µs |"
        )
    if "async" not in modes:
        return 0
    print(
        f"\nasync lag under pgbench: max {max(r['lag_max_s'] for r in results['async']):.2f} s, "
        f"mean {med('async', 'lag_mean_s'):.2f} s; drained {med('async', 'drain_s'):.1f} s after pgbench stopped"
    )
    ratio = med("async", "tps") / off_tps
    verdict = "met" if ratio >= 0.8 else "NOT met"
    print(f"must: async TPS >= 0.8 x mirrors=off: {ratio:.2f} ({verdict})")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(delay_ms=args.delay_ms, secs=secs, reps=reps, results=results), indent=1))
    return 0 if ratio >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
