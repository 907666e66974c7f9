#!/bin/bash
# Build (once) the OpenZFS 2.3 test VM image: Debian 12 + linux 6.1 + zfs-dkms
# 2.3 from bookworm-backports + python3/pytest and the project's runtime deps.
#
# usage: tools/zvm/build.sh            build if needed; print the image dir on stdout
#        tools/zvm/build.sh --dir      only print the image dir (built or not)
#
# The image lives outside the repo in ${SNAPPER_ZVM_CACHE:-/var/cache/snapper/zvm}/<key>/,
# <key> = first 16 hex of sha256(build.sh + zvm-init + packages.txt). A valid cache
# makes this a no-op. The build happens in a temp dir beside the cache and is
# renamed into place only on success, so a killed build never leaves a half cache.
# Needs root and the Debian archive configured in /etc/apt/sources.list.d/*.sources.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${SNAPPER_ZVM_CACHE:-/var/cache/snapper/zvm}
KEY=$(cat "$HERE/build.sh" "$HERE/zvm-init" "$HERE/packages.txt" | sha256sum | cut -c1-16)
OUT=$CACHE/$KEY

# stdout carries only the image dir; everything else goes to stderr
exec 3>&1 1>&2

if [ "${1:-}" = --dir ]; then echo "$OUT" >&3; exit 0; fi

valid() { [ -s "$1/vmlinuz" ] && [ -s "$1/initrd.img" ] && [ -s "$1/root.img" ] && [ -s "$1/versions.txt" ]; }

if valid "$OUT"; then echo "$OUT" >&3; exit 0; fi

[ "$(id -u)" = 0 ] || { echo "zvm build: must run as root" ; exit 1; }
mkdir -p "$CACHE"

# one build at a time; a second caller waits, then finds the cache valid
exec 4>"$CACHE/.lock"
flock 4
if valid "$OUT"; then echo "$OUT" >&3; exit 0; fi
# remove a build dir: first the chroot mounts (/proc, /sys, /dev/pts) a killed
# mmdebstrap may leave behind, then the files, never crossing into a mount
scrub() {
  awk -v d="$1/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r |
    while IFS= read -r m; do umount -l "$m" || true; done
  rm -rf --one-file-system "$1"
}
# holding the lock, any leftover temp dir is from a killed build
for d in "$CACHE"/.build.*; do [ ! -e "$d" ] || scrub "$d"; done

T0=$(date +%s)
echo "zvm build: key $KEY -> $OUT (about 12 min under DKMS)"

# 1. host tools, only if missing
need=""
command -v qemu-system-x86_64 >/dev/null || need="$need qemu-system-x86"
command -v qemu-img >/dev/null || need="$need qemu-utils"
command -v mmdebstrap >/dev/null || need="$need mmdebstrap"
command -v mkfs.ext4 >/dev/null || need="$need e2fsprogs"
if [ -n "$need" ]; then
  apt-get update -q
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $need
fi

# the Debian archive this machine already uses (from its apt sources)
M=$(sed -n "s/^URIs: *//p" /etc/apt/sources.list.d/*.sources | grep -v security | head -n1)
S=$(sed -n "s/^URIs: *//p" /etc/apt/sources.list.d/*.sources | grep security | head -n1)
if [ -z "$M" ] || [ -z "$S" ]; then
  echo "zvm build: no Debian archive found in /etc/apt/sources.list.d/*.sources"; exit 1
fi

TMP=$(mktemp -d "$CACHE/.build.$KEY.XXXXXX")
MPID=""
# on a signal: stop mmdebstrap's whole process group (its own, by its pid)
stop() {
  if [ -n "$MPID" ]; then
    kill -TERM -- "-$MPID" 2>/dev/null || true
    i=0; while [ $i -lt 10 ] && kill -0 "$MPID" 2>/dev/null; do sleep 1; i=$((i + 1)); done
    kill -KILL -- "-$MPID" 2>/dev/null || true
    wait "$MPID" 2>/dev/null || true
  fi
  exit 130
}
trap 'cd /; scrub "$TMP"' EXIT
trap stop INT TERM HUP
cd "$TMP"

# 2. files injected into the guest
mkdir -p overlay/usr/local/sbin overlay/etc/apt/preferences.d
cat > overlay/etc/apt/preferences.d/zfs-backports.pref <<'EOF'
Package: zfs-dkms zfsutils-linux zfs-zed libzfs* libzpool* libnvpair* libuutil*
Pin: release n=bookworm-backports
Pin-Priority: 990
EOF
cp "$HERE/zvm-init" overlay/usr/local/sbin/zvm-init
chmod 755 overlay/usr/local/sbin/zvm-init
printf '127.0.0.1\tlocalhost\n127.0.1.1\tzvm\n::1\tlocalhost ip6-localhost ip6-loopback\n' > overlay/etc/hosts
echo zvm > overlay/etc/hostname
echo "/dev/vda / ext4 rw 0 1" > overlay/etc/fstab

PKGS=$(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$HERE/packages.txt" | grep -v '^$' | paste -sd, -)

# 3. root filesystem; zfs-dkms postinst builds zfs.ko for the 6.1 kernel in the chroot
# (the hooks are run by mmdebstrap, with $1 = the root file system)
# (run in the background in its own session, so a signal here is handled at once)
# shellcheck disable=SC2016
setsid mmdebstrap --variant=minbase \
  --setup-hook='mkdir -p "$1/etc/apt/preferences.d" && cp overlay/etc/apt/preferences.d/zfs-backports.pref "$1/etc/apt/preferences.d/"' \
  --include="$PKGS" \
  --customize-hook='cp -a overlay/. "$1"/' \
  --customize-hook='echo MODULES=list > "$1/etc/initramfs-tools/conf.d/zvm.conf"; printf "virtio_pci\nvirtio_blk\next4\n" >> "$1/etc/initramfs-tools/modules"; chroot "$1" update-initramfs -u -k all' \
  --customize-hook='chroot "$1" sh -c "ls /lib/modules/*/updates/dkms/zfs.ko* && dkms status"' \
  --customize-hook='chroot "$1" dpkg-query -W -f="\${Package} \${Version}\n" > versions.txt' \
  --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*_Packages' \
  bookworm rootfs \
  "deb $M bookworm main contrib" "deb $M bookworm-updates main contrib" \
  "deb $S bookworm-security main" \
  "deb $M bookworm-backports main contrib" &
MPID=$!
wait "$MPID"
MPID=""

# 4. boot artefacts + root disk (sparse; free space serves the guest's /tmp)
set -- rootfs/boot/vmlinuz-*; [ $# = 1 ] || { echo "zvm build: expected one kernel, got: $*"; exit 1; }
cp "$1" vmlinuz
set -- rootfs/boot/initrd.img-*; cp "$1" initrd.img
mkfs.ext4 -q -F -L zvmroot -d rootfs root.img 4G
rm -rf rootfs overlay
grep -E '^(linux-image-[0-9][^ ]*|python3-pytest-timeout|zfs-dkms|zfsutils-linux|python3|python3-pytest|python3-pytest-asyncio|python3-hypothesis|python3-asyncssh|python3-aiohttp|python3-aiofiles|python3-prometheus-client|python3-tenacity|openssh-server) ' versions.txt || true
echo "built in $(( $(date +%s) - T0 ))s, key $KEY" > build-info.txt

# 5. publish atomically
cd "$CACHE"
rm -rf "$OUT"
mv "$TMP" "$OUT"
trap - EXIT
echo "zvm build: done in $(( $(date +%s) - T0 ))s"
echo "$OUT" >&3
