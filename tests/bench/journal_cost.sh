#!/bin/bash
# The journal's cost on the write path (issue 4's closing note): pgbench on
# one mount with both sides up, then with the mirror down (every change
# journaled), alternating ROUNDS times, plus native for reference. Release
# build; backing dirs under /var/tmp.
#   sudo tests/bench/journal_cost.sh [ROUNDS] [SECONDS] [BIN]
set -euo pipefail
ROUNDS=${1:-3}; SECS=${2:-20}
BIN=${3:-$(cd "$(dirname "$0")/../.." && pwd)/target/release/mirrorfs}
PG=/usr/lib/postgresql/15/bin
T=$(mktemp -d /var/tmp/mirrorfs-jc.XXXX); chmod 755 "$T"
mkdir -p "$T/p" "$T/m" "$T/mnt" "$T/native" "$T/sock" "$T/logs"; chown postgres "$T/sock" "$T/native" "$T/logs"
pg() { setpriv --reuid=postgres --regid=postgres --init-groups -- "$PG/$1" "${@:2}"; }
stop_all() { for d in "$T/mnt/db" "$T/native/db"; do [ -f "$d/postmaster.pid" ] && pg pg_ctl -D "$d" stop -m fast -w >/dev/null 2>&1 || true; done; }
cleanup() { stop_all; "$BIN" unmount "$T/mnt" 2>/dev/null || umount -l "$T/mnt" 2>/dev/null || true; rm -rf "$T"; }
trap cleanup EXIT
"$BIN" mount -o allow_other "$T/p|$T/m" "$T/mnt"
chown postgres "$T/mnt"
for d in "$T/mnt/db" "$T/native/db"; do
    pg initdb -A trust -U postgres -D "$d" >/dev/null
done
port=54400
for d in "$T/mnt/db" "$T/native/db"; do
    port=$((port+1)); echo "$port" > "$T/$(basename "$(dirname "$d")").port"
    pg pg_ctl -D "$d" -l "$T/logs/$(basename "$(dirname "$d")").log" -o "-p $port -k $T/sock" -w start >/dev/null
    pg pgbench -h "$T/sock" -p "$port" -i -q -s 10 postgres >/dev/null 2>&1
done
tps() { pg pgbench -h "$T/sock" -p "$(cat "$T/$1.port")" -c 4 -j 2 -T "$SECS" postgres 2>/dev/null | awk '/^tps/ {print int($3)}'; }
for r in $(seq "$ROUNDS"); do
    up=$(tps mnt)
    "$BIN" fail "$T/mnt" mirror >/dev/null
    down=$(tps mnt)
    "$BIN" resync --wait "$T/mnt" >/dev/null
    native=$(tps native)
    python3 -c "print(f'round $r: both up {$up} TPS, mirror down {$down} TPS (ratio {$down/$up:.2f}); native {$native} TPS; up/native {$up/$native:.2f}')"
done
