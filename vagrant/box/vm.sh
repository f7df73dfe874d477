#!/usr/bin/env bash
# `make vm-up | vm-test | vm-destroy`: the project's Vagrantfile under vagrant-libvirt on this host.
#   up       start virtlogd/libvirtd by hand when they do not run (no systemd needed), make the
#            default storage pool, choose KVM when it can run a guest here (tried, and said) else
#            QEMU's TCG, `vagrant up --provider libvirt` (provision.sh installs from the wheelhouse)
#   test     inside: make test-quick, the kernel-backend tests (netem, cgroup v2), the quick suite;
#            everything copied back to REPO/out/vm/
#   destroy  `vagrant destroy`, the box's volumes, and the daemons `up` started: nothing left behind
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
STATE=$HERE/out
export VAGRANT_DEFAULT_PROVIDER=libvirt
log() { printf '[vm] %s\n' "$*"; }
[ "$(id -u)" -eq 0 ] || { echo "vm.sh: must run as root (libvirt)" >&2; exit 1; }
mkdir -p "$STATE"
. "$HERE/common.sh"

kvm_works() {
  # /dev/kvm may be a software module that aborts -cpu host: boot a kernel until it panics
  [ -w /dev/kvm ] || return 1
  local k
  k=$(ls "$REPO"/.cache/guest/linux-image-*/boot/vmlinuz-* 2>/dev/null | head -1)
  [ -n "$k" ] || k=$(ls /boot/vmlinuz-* 2>/dev/null | head -1)
  [ -n "$k" ] || return 1
  timeout 30 qemu-system-x86_64 -accel kvm -cpu host -m 256 -smp 1 -display none -monitor none \
    -serial none -no-reboot -nic none -kernel "$k" -append "panic=1 root=/dev/nonexistent" \
    >/dev/null 2>&1
}

start_daemons() {
  # libvirt's default network is a NAT bridge with iptables rules on the host: never autostart it
  # (the box uses QEMU user-mode networking bound to 127.0.0.1)
  if [ -L /etc/libvirt/qemu/networks/autostart/default.xml ]; then
    rm -f /etc/libvirt/qemu/networks/autostart/default.xml
    log "libvirt's default network will not autostart"
  fi
  for d in virtlogd libvirtd; do
    if ! pgrep -x "$d" >/dev/null; then
      log "starting $d"
      "$d" -d
      pgrep -nx "$d" >> "$STATE/daemons.pids"
    fi
  done
  for _ in $(seq 1 30); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 1; done
  if ! virsh -q pool-info default >/dev/null 2>&1; then
    virsh -q pool-define-as default dir --target /var/lib/libvirt/images >/dev/null
    mkdir -p /var/lib/libvirt/images
    echo default > "$STATE/pool.created"
  fi
  virsh -q pool-start default >/dev/null 2>&1 || true
}

case ${1:-} in
  up)
    apt_install vagrant vagrant-libvirt libvirt-daemon-system qemu-system-x86 qemu-utils
    start_daemons
    if kvm_works; then
      export TESTBED_VM_DRIVER=kvm; log "KVM runs a guest here: driver kvm"
    else
      export TESTBED_VM_DRIVER=qemu
      log "KVM cannot run a guest here (/dev/kvm $( [ -e /dev/kvm ] && echo present || echo absent)): driver qemu (TCG, ~10x slower)"
    fi
    echo "$TESTBED_VM_DRIVER" > "$STATE/driver"
    t0=$(date +%s)
    (cd "$REPO/vagrant" && vagrant up --provider libvirt)
    log "up and provisioned in $(( $(date +%s) - t0 )) s"
    ;;
  test)
    export TESTBED_VM_DRIVER=$(cat "$STATE/driver" 2>/dev/null || echo qemu)
    out=$REPO/out/vm
    rm -rf "$out" && mkdir -p "$out"
    t0=$(date +%s)
    (cd "$REPO/vagrant" && vagrant rsync >/dev/null)
    set +e
    # the synced tree has no .git: its records name the commit it came from (experiments/environment.py)
    commit=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || true)
    dirty=; [ -z "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ] || dirty=1
    (cd "$REPO/vagrant" && vagrant ssh -c "cd /testbed && sudo env TESTBED_GIT_COMMIT=$commit TESTBED_GIT_DIRTY=$dirty bash vagrant/box/inside.sh" ) 2>&1 | tee "$out/console.log"
    rc=${PIPESTATUS[0]}
    set -e
    (cd "$REPO/vagrant" && vagrant ssh -c 'sudo tar -C /testbed/out -cf - vm-results') | tar -C "$out" -xf - || true
    # the quick suite's report (summary.md and plots) is written here, from the guest's records:
    # the host writes it in seconds (2.4 s here), the guest's emulated CPU in many times that
    res=$out/vm-results
    if [ -s "$res/quick/results.jsonl" ] && [ -x "$REPO/.venv/bin/testbed" ]; then
      if "$REPO/.venv/bin/testbed" report "$res/quick" > "$res/report.log" 2>&1; then
        cp "$res/quick/summary.md" "$res/summary.md"
        log "the quick suite's summary: $res/summary.md"
      else
        log "testbed report failed: $res/report.log"; [ "$rc" -ne 0 ] || rc=1
      fi
    fi
    log "vm-test: exit $rc in $(( $(date +%s) - t0 )) s; results in $out/vm-results"
    exit "$rc"
    ;;
  destroy)
    export TESTBED_VM_DRIVER=$(cat "$STATE/driver" 2>/dev/null || echo qemu)
    if command -v libvirtd >/dev/null; then
      start_daemons >/dev/null
      (cd "$REPO/vagrant" && vagrant destroy -f) || log "vagrant destroy failed: removing the domain with virsh"
      # what vagrant could not remove: the project's domains (vagrant names them <dir>_<machine>)
      for d in $(virsh -q list --all --name 2>/dev/null | grep '^vagrant_' || true); do
        virsh -q destroy "$d" >/dev/null 2>&1 || true
        virsh -q undefine "$d" --nvram >/dev/null 2>&1 || virsh -q undefine "$d" >/dev/null 2>&1 || true
        log "domain $d removed"
      done
      for v in $(virsh -q vol-list default 2>/dev/null | awk '/bookworm64|vagrant_/{print $1}'); do
        virsh -q vol-delete "$v" --pool default >/dev/null && log "volume $v removed"
      done
      if [ -e "$STATE/pool.created" ]; then
        virsh -q pool-destroy default >/dev/null 2>&1 || true
        virsh -q pool-undefine default >/dev/null 2>&1 || true
        rm -f "$STATE/pool.created"
      fi
    fi
    if [ -e "$STATE/daemons.pids" ]; then
      while read -r pid; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null && log "stopped daemon $pid"
      done < "$STATE/daemons.pids"
      rm -f "$STATE/daemons.pids"
    fi
    # a QEMU whose daemon went first
    for f in /run/libvirt/qemu/vagrant_*.pid; do
      [ -e "$f" ] || continue
      pid=$(cat "$f"); [ -n "$pid" ] && kill "$pid" 2>/dev/null && log "stopped qemu $pid"
      rm -f "$f"
    done
    rm -f "$STATE/driver"
    log "destroyed"
    ;;
  *) echo "usage: vm.sh up|test|destroy" >&2; exit 2 ;;
esac
