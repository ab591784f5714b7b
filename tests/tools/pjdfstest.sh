#!/bin/bash
# Usage: pjdfstest.sh DIR RESULT_FILE
# Runs the Rust pjdfstest (crates.io) against DIR (must be run as root).
# Writes the full output to RESULT_FILE and prints:
#   pjdfstest: N passed, N failed, N skipped
#   FAILED <test name>        (one per failing test)
# Exit 0 whenever the tool ran to completion (even with failures);
# non-zero if it could not run.
# Optional env: PJDFSTEST_SECONDARY_FS=<dir on another fs> enables the EXDEV tests.
#               PJDFSTEST_CONFIG=<toml> overrides the config file.
set -uo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 DIR RESULT_FILE" >&2
    exit 2
fi
DIR=$1
RESULT=$2
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONFIG=${PJDFSTEST_CONFIG:-$HERE/pjdfstest.toml}
export PATH="$HOME/.cargo/bin:/root/.cargo/bin:/usr/local/sbin:/usr/sbin:/sbin:$PATH"

if [ "$(id -u)" -ne 0 ]; then
    echo "pjdfstest.sh: must run as root (tests switching users are skipped otherwise)" >&2
    exit 2
fi
if ! command -v pjdfstest >/dev/null 2>&1; then
    echo "pjdfstest.sh: pjdfstest not found (cargo install --locked pjdfstest)" >&2
    exit 2
fi
if [ ! -d "$DIR" ]; then
    echo "pjdfstest.sh: $DIR is not a directory" >&2
    exit 2
fi
if [ ! -f "$CONFIG" ]; then
    echo "pjdfstest.sh: config $CONFIG missing" >&2
    exit 2
fi

# Dummy users/groups: nobody:nogroup (Debian base) and tests:tests.
if ! getent group tests >/dev/null; then
    groupadd --system tests || { echo "pjdfstest.sh: groupadd tests failed" >&2; exit 2; }
fi
if ! id -u tests >/dev/null 2>&1; then
    useradd --system --gid tests --no-create-home --home-dir / \
        --shell /usr/sbin/nologin --comment "Dummy user for pjdfstest" tests \
        || { echo "pjdfstest.sh: useradd tests failed" >&2; exit 2; }
fi
for u in nobody tests; do
    id -u "$u" >/dev/null 2>&1 || { echo "pjdfstest.sh: user $u missing" >&2; exit 2; }
done

# The user-switching tests need nobody/tests to reach DIR: every ancestor must be
# world-searchable, and a FUSE mount must allow other users (allow_other).
if ! setpriv --reuid=nobody --regid=nogroup --clear-groups -- test -x "$DIR" 2>/dev/null; then
    echo "pjdfstest.sh: WARNING: user nobody cannot search $DIR (0700 ancestor or FUSE without allow_other?);" \
         "user-switching tests will fail with EACCES" >&2
fi

mkdir -p "$(dirname "$RESULT")"
args=(-c "$CONFIG" -p "$DIR")
if [ -n "${PJDFSTEST_SECONDARY_FS:-}" ]; then
    args+=(-s "$PJDFSTEST_SECONDARY_FS")
fi

# pjdfstest exits 1 both on test failures and on config errors, so success of
# the run is judged by the presence of its final "Summary:" line.
# Run from / so the tool never depends on the caller's cwd.
(cd / && NO_COLOR=1 CLICOLOR=0 RUST_BACKTRACE=0 pjdfstest "${args[@]}") >"$RESULT" 2>&1
rc=$?
# Strip any ANSI colour codes defensively.
sed -i 's/\x1b\[[0-9;]*m//g' "$RESULT"

summary=$(grep -E '^Summary: ' "$RESULT" | tail -n1)
if [ -z "$summary" ]; then
    echo "pjdfstest.sh: pjdfstest did not complete (exit $rc); see $RESULT" >&2
    tail -n 20 "$RESULT" >&2
    exit 3
fi
# Summary: F failed, S skipped, P passed, E expected failures, T total
failed=$(sed -nE 's/.* ([0-9]+) failed,.*/\1/p' <<<"$summary")
skipped=$(sed -nE 's/.* ([0-9]+) skipped,.*/\1/p' <<<"$summary")
passed=$(sed -nE 's/.* ([0-9]+) passed,.*/\1/p' <<<"$summary")

echo "pjdfstest: ${passed} passed, ${failed} failed, ${skipped} skipped"
# Result lines: "<name><spaces>FAILED" and "<name><spaces>PASSED UNEXPECTEDLY"
# (the latter is counted as failed by pjdfstest too).
grep -E '^[^[:space:]]+[[:space:]]+(FAILED|PASSED UNEXPECTEDLY)$' "$RESULT" \
    | awk '{print "FAILED " $1}'
exit 0
