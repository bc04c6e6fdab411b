#!/usr/bin/env bash
# The main job end to end on embedded defaults: a self-signed PKI in a temporary folder, a
# generated sample disk, a receiver on loopback, a full and an incremental point, restores of
# both points, a byte-for-byte check of each against the source as it was, and a DR drill that
# verifies every block of the newest point and (with QEMU installed) boots its boot sector.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${REWIND_DEMO_MIB:-1024}

echo "== building (release)"
cargo build --release --quiet -p rewind-agent -p rewind-receiver
B=$PWD/target/release
W=$(mktemp -d /tmp/rewind-demo.XXXXXX)
cleanup() { [ -n "${RX_PID:-}" ] && kill "$RX_PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT
cd "$W"

echo "== PKI in $W/pki"
"$B/rewind-receiver" pki init --dir pki >/dev/null
"$B/rewind-receiver" pki issue --dir pki --agent host1 >/dev/null

echo "== sample disk: ${SIZE_MIB} MiB (zeros, text, binary, random)"
truncate -s "${SIZE_MIB}M" vda.raw
for ((mib = 0; mib < SIZE_MIB; mib += 8)); do
  case $(( (mib / 8) % 4 )) in
    0) ;;  # hole
    1) (yes "Rewind keeps offsite, restorable, point-in-time clones of running VMs." || true) | head -c 8M | dd of=vda.raw bs=1M seek=$mib conv=notrunc status=none ;;
    2) head -c 4M /dev/urandom | dd of=vda.raw bs=1M seek=$mib conv=notrunc status=none ;;
    3) dd if="$B/rewind-agent" of=vda.raw bs=1M seek=$mib count=8 conv=notrunc status=none ;;
  esac
done
# A boot sector in block 0 (prints a marker on COM1 and halts) so the DR drill can boot it.
printf '\xfa\x31\xc0\x8e\xd8\xba\xf8\x03\xbe\x17\x7c\xfc\xac\x84\xc0\x74\x03\xee\xeb\xf8\xf4\xeb\xfdREWIND-DEMO-BOOTED\r\n\x00' |
  dd of=vda.raw conv=notrunc status=none
printf '\x55\xaa' | dd of=vda.raw bs=1 seek=510 conv=notrunc status=none

"$B/rewind-receiver" serve --data data --listen 127.0.0.1:0 --pki pki > serve.out 2> serve.log &
RX_PID=$!
for _ in $(seq 100); do grep -q listening serve.out 2>/dev/null && break; sleep 0.1; done
ADDR=$(awk '{print $NF}' serve.out)
echo "== receiver on $ADDR (mutual TLS)"

sync_once() {
  "$B/rewind-agent" sync --receiver "https://$ADDR" --ca pki/ca.pem --cert pki/host1.pem \
    --key pki/host1.key --state state --vm demo --disk vda=vda.raw --once --json 2>agent.log
}
show() { python3 -c 'import json,sys; r=json.load(sys.stdin); d=r["disks"][0]; print("   point %d: %s, %d changed blocks, %.1f MB read, %.1f MB sent, %.2fs" % (r["point"], d["mode"], d["changed_blocks"], d["read_bytes"]/1e6, r["sent_bytes"]/1e6, r["seconds"]))'; }

echo "== point 1: full seed"
sync_once > p1.json; show < p1.json
cp --sparse=always vda.raw at-p1.raw

echo "== rewriting 1% of the blocks"
BLOCKS=$(( SIZE_MIB * 16 ))
for ((i = 0; i < BLOCKS / 100; i++)); do
  dd if=/dev/urandom of=vda.raw bs=64K seek=$(( 1 + (RANDOM * 32768 + RANDOM) % (BLOCKS - 1) )) count=1 conv=notrunc status=none
done
echo "== point 2: incremental"
sync_once > p2.json; show < p2.json

echo "== points"
"$B/rewind-receiver" points --data data --vm demo

for p in 1 2; do
  "$B/rewind-receiver" restore --data data --vm demo --disk vda --point "$p" --out "restored-$p.raw" >/dev/null
done
cmp at-p1.raw restored-1.raw && echo "== point 1 restored bit-exact"
cmp vda.raw restored-2.raw && echo "== point 2 restored bit-exact"
if command -v qemu-system-x86_64 >/dev/null; then
  echo "== DR drill: verify every block of point 2, boot it in an isolated QEMU from the store"
  "$B/rewind-receiver" drill --data data --vm demo --boot --boot-timeout 120 --expect-serial REWIND-DEMO-BOOTED 2>/dev/null
else
  echo "== DR drill: verify every block of point 2 (install qemu-system-x86 to boot it too)"
  "$B/rewind-receiver" drill --data data --vm demo 2>/dev/null
fi
echo "== store: $(du -sh data | cut -f1) for two points of a ${SIZE_MIB} MiB disk ($(du -sh vda.raw | cut -f1) allocated)"
echo "OK"
