#!/bin/bash
# Provision a fresh Debian 12 CI machine (run as root, CI=true) for mirrorfs tests.
# Rust and cargo-nextest are assumed preinstalled.  Idempotent.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:/usr/local/sbin:/usr/sbin:/sbin:$PATH"

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: must run as root" >&2
    exit 1
fi

# Do not let postgresql-15 create and start a default cluster on :5432;
# tests run their own initdb from /usr/lib/postgresql/15/bin.
mkdir -p /etc/postgresql-common/createcluster.d
echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/50-mirrorfs-ci.conf

# Packages installed here (prometheus, for its promtool) must not start
# their services on the CI machine.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi

apt-get update
apt-get install -y --no-install-recommends \
    ca-certificates \
    build-essential pkg-config \
    fuse3 \
    sqlite3 \
    postgresql-15 postgresql-client-15 \
    xfsprogs e2fsprogs btrfs-progs \
    attr acl libacl1-dev \
    util-linux mount kmod procps \
    sshfs openssh-server openssh-client \
    fio mergerfs hyperfine \
    prometheus \
    man-db zsh fish systemd
# libacl1-dev: needed to build pjdfstest (exacl links -lacl).
# prometheus: its promtool checks the text of `mirrorfs metrics`.
# man-db, zsh, fish: the package test reads the installed man pages and
# completes with each shell.
# util-linux provides zramctl, losetup, mountpoint, setpriv; kmod provides modprobe (zram).

# Let non-root FUSE mounts use -o allow_other (root mounts don't need this).
if [ -f /etc/fuse.conf ] && ! grep -qE '^[[:space:]]*user_allow_other' /etc/fuse.conf; then
    echo "user_allow_other" >> /etc/fuse.conf
fi

# pjdfstest / fsx (Rust, crates.io) and cargo-deb (the package test) only
# if missing.
missing=()
command -v cargo-deb >/dev/null 2>&1 || missing+=(cargo-deb)
command -v pjdfstest >/dev/null 2>&1 || missing+=(pjdfstest)
command -v fsx >/dev/null 2>&1 || missing+=(fsx)
if [ ${#missing[@]} -gt 0 ]; then
    cargo install --locked "${missing[@]}"
fi

# Dummy user/group for pjdfstest (nobody:nogroup exists on Debian already).
getent group tests >/dev/null || groupadd --system tests
id -u tests >/dev/null 2>&1 || useradd --system --gid tests --no-create-home \
    --home-dir / --shell /usr/sbin/nologin --comment "Dummy user for pjdfstest" tests

# Sanity checks.
for b in pjdfstest fsx fusermount3 sqlite3 mkfs.xfs mkfs.ext4 mkfs.btrfs getfattr setfattr \
         zramctl sshfs sshd fio mergerfs hyperfine promtool cargo-deb man zsh fish systemd-analyze; do
    command -v "$b" >/dev/null 2>&1 || { echo "install.sh: $b missing" >&2; exit 1; }
done
for b in initdb pg_ctl postgres; do
    [ -x "/usr/lib/postgresql/15/bin/$b" ] || { echo "install.sh: postgres $b missing" >&2; exit 1; }
done
id nobody >/dev/null && getent group nogroup >/dev/null && id tests >/dev/null

# Persist ~/.cargo/bin on PATH for later CI steps (GitHub Actions style), if available.
if [ -n "${GITHUB_PATH:-}" ]; then
    echo "${CARGO_HOME:-$HOME/.cargo}/bin" >> "$GITHUB_PATH"
fi

# Kernel fault fixtures (tests/it/faults.rs). The tests start a private sshd
# of their own on 127.0.0.1 (the system ssh service is neither enabled nor
# started here); sshd needs its privilege separation directory. zram and loop
# devices are made per test (zram hot_add, losetup -f) and removed after.
mkdir -p /run/sshd
chmod 0755 /run/sshd
[ -d /sys/class/zram-control ] || modprobe zram num_devices=0 || true
[ -d /sys/class/zram-control ] || { echo "install.sh: no zram in this kernel (/sys/class/zram-control)" >&2; exit 1; }
for b in sshd ssh-keygen sshfs xfs_io losetup mkfs.ext4 mkfs.xfs mount umount setpriv runuser pgbench; do
    command -v "$b" >/dev/null 2>&1 || { echo "install.sh: $b missing" >&2; exit 1; }
done

# FUSE over io_uring: the kernel offers it to servers only with this
# switch on; mirrorfs then serves through it (tests/it/transport.rs checks
# both transports).
U=/sys/module/fuse/parameters/enable_uring
[ -w "$U" ] || { echo "install.sh: this kernel has no FUSE over io_uring ($U)" >&2; exit 1; }
echo Y > "$U"

echo "install.sh: done"
