#!/bin/bash
# Run the project's pytest suite inside a qemu VM with OpenZFS 2.3.
#
# usage: tools/zvm/test.sh [pytest args...]     (default: -m zfs -q tests)
#
# Builds the image if needed (tools/zvm/build.sh, cached outside the repo),
# ships the repo's tracked + untracked-not-ignored files to the guest as a raw
# tar disk, boots under TCG with no network, streams the guest console to
# stdout and exits with pytest's exit code from the guest (5 = no tests
# collected is passed through as is). Other exit codes of its own:
#   124  timeout (SNAPPER_ZVM_TIMEOUT seconds, default 1800)
#   125  the guest never printed "ZVM: RESULT rc=N" (boot or setup failure)
#   130  interrupted
# Env: SNAPPER_ZVM_TIMEOUT, SNAPPER_ZVM_CACHE (see build.sh), TMPDIR (work dir).
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(git -C "$HERE" rev-parse --show-toplevel)
TIMEOUT=${SNAPPER_ZVM_TIMEOUT:-1800}
[ $# -gt 0 ] || set -- -m zfs -q tests
for a in "$@"; do
  case $a in *$'\n'*) echo "zvm: pytest arguments must not contain newlines" >&2; exit 2;; esac
done

log() { echo "zvm: $*" >&2; }
T0=$(date +%s)

IMG=$("$HERE/build.sh")
T1=$(date +%s)
log "image $IMG (ready after $((T1 - T0))s)"

W=$(mktemp -d "${TMPDIR:-/var/tmp}/snapper-zvm.XXXXXX")
QPID="" SPID=""
# shellcheck disable=SC2317  # called from the EXIT trap
cleanup() {
  if [ -n "$QPID" ] && kill -0 "$QPID" 2>/dev/null; then
    kill "$QPID" 2>/dev/null || true
    for _ in 1 2 3 4 5; do kill -0 "$QPID" 2>/dev/null || break; sleep 1; done
    kill -9 "$QPID" 2>/dev/null || true
  fi
  if [ -n "$SPID" ]; then wait "$SPID" 2>/dev/null || true; fi
  rm -rf "$W"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM HUP

# 1. the source: a tar of the repo's files (skipping tracked files deleted in
#    the work tree) plus the pytest arguments, one per line
(
  cd "$ROOT"
  git ls-files -co --exclude-standard -z |
    while IFS= read -r -d '' f; do
      if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
    done |
    tar --null -T - --owner=0 --group=0 -cf "$W/src.tar"
)
# the project's Python dependencies for the guest (bookworm's are too old),
# installed once per pyproject.toml into the cache beside the image
SITE=$("$HERE/site.sh")
tar -rf "$W/src.tar" -C "$SITE/.." --owner=0 --group=0 --transform 's,^[^/]*,.zvm-site,' \
  "$(basename "$SITE")"
printf '%s\n' "$@" > "$W/.zvm-pytest-args"
tar -rf "$W/src.tar" -C "$W" --owner=0 --group=0 .zvm-pytest-args
log "source tar $(du -h --apparent-size "$W/src.tar" | cut -f1), pytest args: $*"

# 2. disks: a throwaway overlay on the cached root image, a fresh scratch disk
qemu-img create -q -f qcow2 -b "$IMG/root.img" -F raw "$W/root.qcow2"
truncate -s 2G "$W/scratch.img"
: > "$W/console.log"

# 3. boot (TCG: /dev/kvm is not usable here); the guest console goes to a file
qemu-system-x86_64 -nodefaults -no-user-config -display none -monitor none \
  -accel tcg,thread=multi,tb-size=512 -cpu max -m 2048 -smp 2 \
  -no-reboot -nic none \
  -kernel "$IMG/vmlinuz" -initrd "$IMG/initrd.img" \
  -append "root=/dev/vda rw console=ttyS0 quiet panic=1 init=/usr/local/sbin/zvm-init" \
  -drive "file=$W/root.qcow2,if=none,id=root,format=qcow2,cache=unsafe,discard=unmap" \
  -device virtio-blk-pci,drive=root,serial=zvmroot \
  -drive "file=$W/scratch.img,if=none,id=scratch,format=raw,cache=unsafe" \
  -device virtio-blk-pci,drive=scratch,serial=zvmscratch \
  -drive "file=$W/src.tar,if=none,id=src,format=raw,readonly=on" \
  -device virtio-blk-pci,drive=src,serial=zvmsrc \
  -serial "file:$W/console.log" \
  </dev/null >"$W/qemu.log" 2>&1 &
QPID=$!
log "qemu pid $QPID, timeout ${TIMEOUT}s"

# 4. stream the console live (tail stops by itself once qemu is gone)
{ tail -n +1 -f --pid="$QPID" "$W/console.log" | sed -u 's/\r$//'; } &
SPID=$!

timed_out=0
while kill -0 "$QPID" 2>/dev/null; do
  if [ $(( $(date +%s) - T1 )) -ge "$TIMEOUT" ]; then
    timed_out=1
    log "TIMEOUT after ${TIMEOUT}s, killing qemu (pid $QPID)"
    kill "$QPID" 2>/dev/null || true
    sleep 2
    kill -9 "$QPID" 2>/dev/null || true
    break
  fi
  sleep 1
done
wait "$QPID" 2>/dev/null || true
QPID=""
wait "$SPID" 2>/dev/null || true
SPID=""
T2=$(date +%s)

if [ -s "$W/qemu.log" ]; then log "qemu said:"; sed 's/^/  /' "$W/qemu.log" >&2; fi
rc=$(sed -n 's/\r$//; s/^ZVM: RESULT rc=\([0-9]\{1,3\}\)$/\1/p' "$W/console.log" | tail -n 1)
boot=$(sed -n 's/\r$//; s/^ZVM: PYTEST-START.*(uptime \([0-9.]*\)s)$/\1/p' "$W/console.log" | tail -n 1)
log "timing: image ready $((T1 - T0))s, guest boot-to-pytest ${boot:-?}s, VM $((T2 - T1))s, total $((T2 - T0))s"
if [ "$timed_out" = 1 ]; then log "result: timeout"; exit 124; fi
if [ -z "$rc" ]; then log "result: the guest printed no 'ZVM: RESULT' line"; exit 125; fi
log "result: pytest rc=$rc"
exit "$rc"
