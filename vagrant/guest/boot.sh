#!/usr/bin/env bash
# Boot the test guest once: run JOB_SCRIPT (a shell script, copied to the results share as
# job.sh) in Debian's kernel under QEMU/TCG with the host's root read-only; the guest writes
# into RESULTS_DIR.  The console goes to stdout.  Exit: the job's exit code (124 on timeout,
# 125 when the guest could not start the job).
# Usage: boot.sh CACHE_DIR RESULTS_DIR TIMEOUT_S JOB_SCRIPT
set -euo pipefail
CACHE=${1:?}; RESULTS=${2:?}; TIMEOUT=${3:?}; JOB=${4:?}
HERE=$(cd "$(dirname "$0")" && pwd)
eval "$("$HERE/prepare.sh" "$CACHE")"
mkdir -p "$RESULTS"
rm -f "$RESULTS/rc"
cp "$JOB" "$RESULTS/job.sh"
# /dev/kvm here may be a software nested-virtualization module that cannot run -cpu max:
# TCG (multi-threaded) is the portable choice; TESTBED_GUEST_ACCEL=kvm where KVM really works.
ACCEL=${TESTBED_GUEST_ACCEL:-tcg,thread=multi}
CPU=max; [ "${ACCEL%%,*}" = kvm ] && CPU=host
set +e
timeout --kill-after=10 "$TIMEOUT" qemu-system-x86_64 \
  -accel "$ACCEL" -cpu "$CPU" -smp "${TESTBED_GUEST_CPUS:-2}" -m "${TESTBED_GUEST_MEMORY_MB:-3072}" \
  -display none -monitor none -serial stdio -no-reboot -nic none \
  -kernel "$KERNEL" -initrd "$INITRD" \
  -append "console=ttyS0 quiet loglevel=3 panic=-1 tb.kver=$KVER tb.mods=$MODULES" \
  -device virtio-rng-pci \
  -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
  -virtfs "local,path=$RESULTS,mount_tag=results,security_model=none,multidevs=remap" </dev/null
q=$?
set -e
if [ $q -eq 124 ] || [ $q -eq 137 ]; then
  echo "[guest] timed out after ${TIMEOUT}s" >&2
  exit 124
fi
if [ ! -s "$RESULTS/rc" ]; then
  echo "[guest] the guest ended without a result (qemu exit $q)" >&2
  exit 125
fi
exit "$(cat "$RESULTS/rc")"
