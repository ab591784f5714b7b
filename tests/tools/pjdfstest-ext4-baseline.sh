#!/bin/bash
# Usage: pjdfstest-ext4-baseline.sh RESULT_FILE
# Builds a 1 GiB loop-mounted ext4 under a temp dir, runs pjdfstest.sh on it,
# and always unmounts / detaches the loop device / removes the image.
set -euo pipefail
if [ $# -ne 1 ]; then
    echo "usage: $0 RESULT_FILE" >&2
    exit 2
fi
RESULT=$(realpath -m "$1")
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PATH="$HOME/.cargo/bin:/usr/local/sbin:/usr/sbin:/sbin:$PATH"

WORK=$(mktemp -d /tmp/pjd-ext4.XXXXXX)
# mktemp -d makes a 0700 dir; the dummy users (nobody, tests) must be able to
# traverse every ancestor of the test dir, or the user-switching tests get EACCES.
chmod 0755 "$WORK"
IMG=$WORK/ext4.img
MNT=$WORK/mnt
LOOP=""

cleanup() {
    set +e
    cd /
    if mountpoint -q "$MNT"; then
        umount "$MNT" || umount -l "$MNT"
    fi
    if [ -n "$LOOP" ]; then
        losetup -d "$LOOP"
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

truncate -s 1G "$IMG"
mkfs.ext4 -q -F "$IMG"
LOOP=$(losetup --find --show "$IMG")
mkdir -p "$MNT"
mount -t ext4 "$LOOP" "$MNT"
chmod 0755 "$MNT"

"$HERE/pjdfstest.sh" "$MNT" "$RESULT"
