#!/bin/bash
# Resync and verify throughput on one large file (issue 4's closing note):
#   sudo tests/bench/resync.sh [SIZE_MIB] [BIN]
# 1. a SIZE_MIB file written through the mount; the mirror failed by hand;
#    1% of its 4 KiB pages rewritten at random; `mirrorfs resync --wait`;
# 2. the same with the whole file rewritten;
# 3. `mirrorfs verify` offline on the pair, with the page cache dropped.
# Prints the resync summaries and MiB/s. Backing dirs under /var/tmp (disk).
set -euo pipefail
SIZE=${1:-2048}
BIN=${2:-$(dirname "$0")/../../target/release/mirrorfs}
T=$(mktemp -d /var/tmp/mirrorfs-bench.XXXX)
mkdir -p "$T/p" "$T/m" "$T/mnt"
cleanup() { "$BIN" unmount "$T/mnt" 2>/dev/null || umount -l "$T/mnt" 2>/dev/null || true; rm -rf "$T"; }
trap cleanup EXIT
"$BIN" mount "$T/p|$T/m" "$T/mnt"
dd if=/dev/urandom of="$T/mnt/big" bs=1M count="$SIZE" conv=fsync status=none
resync() {
    sync; echo 3 > /proc/sys/vm/drop_caches
    local t0=$(date +%s.%N)
    local out=$("$BIN" resync --wait "$T/mnt")
    local t1=$(date +%s.%N)
    echo "$1: $out"
    python3 -c "print(f'$1: {$SIZE/($t1-$t0):.0f} MiB/s of file, {$t1-$t0:.1f} s wall')"
}
"$BIN" fail "$T/mnt" mirror >/dev/null
python3 - "$T/mnt/big" "$SIZE" <<'PY'
import os, random, sys
fd = os.open(sys.argv[1], os.O_WRONLY); pages = int(sys.argv[2]) * 256
rnd = random.Random(42)
for p in rnd.sample(range(pages), pages // 100):
    os.pwrite(fd, os.urandom(4096), p * 4096)
os.fsync(fd); os.close(fd)
PY
resync "1% of pages changed"
"$BIN" fail "$T/mnt" mirror >/dev/null
dd if=/dev/urandom of="$T/mnt/big" bs=1M count="$SIZE" conv=notrunc,fsync status=none
resync "fully changed"
"$BIN" unmount "$T/mnt"
sync; echo 3 > /proc/sys/vm/drop_caches
t0=$(date +%s.%N); "$BIN" verify "$T/p|$T/m" >/dev/null; t1=$(date +%s.%N)
python3 -c "print(f'verify offline: {2*$SIZE/($t1-$t0):.0f} MiB/s read ({$SIZE} MiB per side, {$t1-$t0:.1f} s)')"
