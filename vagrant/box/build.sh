#!/usr/bin/env bash
# `make vm-box`: build the Vagrant box debian/bookworm64 for the libvirt provider from Debian
# packages alone (no box download), and register it with `vagrant box add`.
#   debootstrap bookworm into an ext4 partition of a raw disk; GRUB written with grub-mkimage
#   and dd (a loop device here does not scan partitions, so grub-install cannot map the disk);
#   sync, qemu-img convert to qcow2 and qemu-img compare against the raw disk; metadata.json +
#   Vagrantfile + box.img in a tar.
# Idempotent and cached: nothing is rebuilt while the box file matches this script, and it is
# registered only when vagrant does not list it.  Root.  Usage: build.sh [OUT_DIR]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=${1:-$HERE/out}
NAME=debian/bookworm64
SUITE=bookworm
DISK_GB=${TESTBED_BOX_DISK_GB:-24}
MIRROR=${TESTBED_BOX_MIRROR:-http://deb.debian.org/debian}
PKGS=linux-image-amd64,grub-pc-bin,grub2-common,openssh-server,sudo,rsync,qemu-guest-agent,dbus,ca-certificates,python3,iproute2,ifupdown,isc-dhcp-client,kmod
export DEBIAN_FRONTEND=noninteractive
log() { printf '[vm-box] %s\n' "$*"; }
[ "$(id -u)" -eq 0 ] || { echo "build.sh: must run as root (debootstrap, loop devices)" >&2; exit 1; }

. "$HERE/common.sh"
apt_install debootstrap qemu-utils grub-pc-bin grub2-common e2fsprogs fdisk vagrant vagrant-libvirt
KEY_PUB=$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | head -1)
[ -n "$KEY_PUB" ] || { echo "build.sh: vagrant's insecure public key not found" >&2; exit 1; }

mkdir -p "$OUT"
BOX=$OUT/debian-bookworm64-libvirt.box
# The testbed's own system packages (provision.sh's APT_PKGS) are installed in the box at native
# speed: dpkg inside a TCG guest took most of an hour for them; provision.sh then finds them there.
PROVISION=$HERE/../provision.sh
APT_PKGS=$(sed -n '/^APT_PKGS=(/,/)/p' "$PROVISION" | sed -e 's/#.*//' -e 's/APT_PKGS=(//' -e 's/)//' | xargs)
[ -n "$APT_PKGS" ] || { echo "build.sh: no APT_PKGS list found in $PROVISION" >&2; exit 1; }
APT_PKGS="$APT_PKGS apparmor"  # the box boots Debian's kernel, which enforces AppArmor (see provision.sh)
# The guest's venv too, when there is a wheelhouse (`make vm-up` builds one first): pip in a TCG guest
# took ~30 minutes for it; provision.sh in the guest then finds it up to date and installs nothing.
WH=$REPO/vagrant/wheelhouse
[ -s "$WH/requirements.txt" ] || WH=
# The node containers' rootfs (debootstrap from the host's mirror, `testbed/hosts/images.py`) too, made
# on the host when this host has the testbed's venv: the guest would otherwise debootstrap it from the
# internet, through QEMU's user-mode NAT, at TCG speed.
PY=$REPO/.venv/bin/python
ROOTFS= MODEL=
if [ -x "$PY" ]; then
  ROOTFS=$(cd "$REPO" && "$PY" -c 'from testbed.hosts.images import build_rootfs, packages
print(build_rootfs(packages())[0])') || { echo "build.sh: the node image's rootfs could not be built" >&2; exit 1; }
  # And SmolLM2's converted checkpoint (testbed/model/loading.py), converted here: the guest's quick
  # suite would otherwise convert the GGUF itself at TCG speed (it had not finished after 8 minutes).
  MODEL=$(cd "$REPO" && "$PY" -c 'from testbed.model.loading import default_model_dir
print(default_model_dir())') || { echo "build.sh: the SmolLM2 checkpoint could not be converted" >&2; exit 1; }
fi
stamp=$( (cat "$0" "$HERE/Vagrantfile.box"; echo "$APT_PKGS" "${ROOTFS##*/}"
          [ -z "$MODEL" ] || cat "$MODEL/config.json" "$REPO/testbed/model/loading.py"
          [ -z "$WH" ] || cat "$REPO/pyproject.toml" "$PROVISION" "$WH/requirements.txt") | sha256sum | cut -c1-16)
if [ -s "$BOX" ] && [ "$(cat "$BOX.key" 2>/dev/null)" = "$stamp" ]; then
  log "cached: $BOX"
else
  t0=$(date +%s)
  raw=$OUT/disk.raw; mnt=$OUT/mnt; loop=
  cleanup() {
    for m in testbed/vagrant/wheelhouse dev/pts dev proc sys ""; do
      mountpoint -q "$mnt/$m" 2>/dev/null && umount "$mnt/$m"
    done
    [ -n "$loop" ] && losetup -d "$loop" 2>/dev/null
    rm -f "$raw"
  }
  trap cleanup EXIT
  rm -f "$raw" "$BOX" "$BOX.key"
  truncate -s "${DISK_GB}G" "$raw"
  echo 'start=2048, type=83, bootable' | sfdisk -q "$raw"
  # the partition by offset: this loop driver does not scan partitions
  loop=$(losetup -f --show -o $((2048 * 512)) "$raw")
  mkfs.ext4 -q -L root "$loop"
  mkdir -p "$mnt" && mount "$loop" "$mnt"
  log "debootstrap $SUITE (+ $PKGS)"
  debootstrap --include="$PKGS" "$SUITE" "$mnt" "$MIRROR" > "$OUT/debootstrap.log" 2>&1 \
    || { tail -20 "$OUT/debootstrap.log"; exit 1; }
  log "debootstrap done in $(( $(date +%s) - t0 )) s"

  # --- the system: fstab, network (eth0 by DHCP), user vagrant with the insecure key ---------------
  echo "LABEL=root / ext4 defaults,errors=remount-ro 0 1" > "$mnt/etc/fstab"
  echo "bookworm64" > "$mnt/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 bookworm64\n' > "$mnt/etc/hosts"
  printf 'auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet dhcp\n' > "$mnt/etc/network/interfaces"
  cp /etc/apt/sources.list "$mnt/etc/apt/sources.list" 2>/dev/null || true
  mount --bind /dev "$mnt/dev"; mount --bind /dev/pts "$mnt/dev/pts"
  mount -t proc proc "$mnt/proc"; mount -t sysfs sys "$mnt/sys"
  chroot "$mnt" useradd -m -s /bin/bash -U vagrant
  install -d -m 700 -o 1000 -g 1000 "$mnt/home/vagrant/.ssh"
  install -m 600 -o 1000 -g 1000 "$KEY_PUB" "$mnt/home/vagrant/.ssh/authorized_keys"
  echo 'vagrant ALL=(ALL) NOPASSWD: ALL' > "$mnt/etc/sudoers.d/vagrant" && chmod 440 "$mnt/etc/sudoers.d/vagrant"
  echo 'UseDNS no' > "$mnt/etc/ssh/sshd_config.d/vagrant.conf"
  chroot "$mnt" systemctl enable ssh >/dev/null 2>&1 || true
  log "installing the testbed's system packages in the box: $APT_PKGS"
  # no service starts inside the chroot (docker, openvswitch): policy-rc.d says no while installing
  printf '#!/bin/sh\nexit 101\n' > "$mnt/usr/sbin/policy-rc.d" && chmod 755 "$mnt/usr/sbin/policy-rc.d"
  # shellcheck disable=SC2086
  chroot "$mnt" env DEBIAN_FRONTEND=noninteractive sh -c "apt-get update -qq && \
    apt-get install -y -qq --no-install-recommends $APT_PKGS" >> "$OUT/debootstrap.log" 2>&1 \
    || { tail -20 "$OUT/debootstrap.log"; exit 1; }
  rm -f "$mnt/usr/sbin/policy-rc.d"
  chroot "$mnt" apt-get clean
  if [ -n "$WH" ]; then
    # the tree where the guest will have it (vagrant's rsync keeps the excluded .venv there) and the
    # wheelhouse at the path the guest's provision.sh reads it from: the same stamp in both
    log "the testbed's venv in the box (/testbed/.venv) from the wheelhouse"
    t1=$(date +%s)
    mkdir -p "$mnt/testbed/vagrant/wheelhouse"
    rsync -a --exclude=/.venv/ --exclude=/.git/ --exclude=/out/ --exclude=/results/ --exclude=/.cache/ \
      --exclude=/vagrant/box/out/ --exclude=/vagrant/.vagrant/ --exclude=/vagrant/wheelhouse/ "$REPO/" "$mnt/testbed/"
    mount --bind "$WH" "$mnt/testbed/vagrant/wheelhouse"
    chroot "$mnt" env TESTBED_PYTHON_ONLY=1 TESTBED_NO_DOCKER=1 bash /testbed/vagrant/provision.sh /testbed \
      >> "$OUT/debootstrap.log" 2>&1 || { tail -20 "$OUT/debootstrap.log"; exit 1; }
    umount "$mnt/testbed/vagrant/wheelhouse"
    log "venv done in $(( $(date +%s) - t1 )) s"
  fi
  if [ -n "$ROOTFS" ]; then
    log "the node image's rootfs in the box: ${ROOTFS##*/}"
    install -d "$mnt/var/cache/edgellm-testbed" && cp "$ROOTFS" "$mnt/var/cache/edgellm-testbed/"
  else
    log "no venv here to make the node image's rootfs with: the guest will debootstrap it itself"
  fi
  if [ -n "$MODEL" ]; then
    # where loading.cache_root() looks for root in the guest (inside.sh runs as root)
    log "SmolLM2's checkpoint in the box: /root/.cache/edgellm-testbed/models/${MODEL##*/}"
    install -d -m 700 "$mnt/root/.cache"
    install -d "$mnt/root/.cache/edgellm-testbed/models"
    cp -a "$MODEL" "$mnt/root/.cache/edgellm-testbed/models/"
  fi
  kver=$(ls "$mnt/lib/modules" | sort -V | tail -1)

  # --- GRUB by hand: core.img with what reads /boot/grub from partition 1, boot.img in the MBR ------
  mkdir -p "$mnt/boot/grub/i386-pc"
  cp /usr/lib/grub/i386-pc/*.mod /usr/lib/grub/i386-pc/*.lst "$mnt/boot/grub/i386-pc/"
  cat > "$mnt/boot/grub/grub.cfg" <<CFG
set timeout=1
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
menuentry "Debian GNU/Linux ($kver)" {
  insmod part_msdos
  insmod ext2
  search --no-floppy --label root --set=root
  linux /boot/vmlinuz-$kver root=LABEL=root ro net.ifnames=0 biosdevname=0 console=tty0 console=ttyS0,115200
  initrd /boot/initrd.img-$kver
}
CFG
  grub-mkimage -O i386-pc -o "$OUT/core.img" -p '(hd0,msdos1)/boot/grub' biosdisk part_msdos ext2
  for m in dev/pts dev proc sys; do umount "$mnt/$m"; done
  umount "$mnt"; blockdev --flushbufs "$loop" 2>/dev/null || true; losetup -d "$loop"; loop=
  dd if=/usr/lib/grub/i386-pc/boot.img of="$raw" bs=440 count=1 conv=notrunc status=none
  dd if="$OUT/core.img" of="$raw" bs=512 seek=1 conv=notrunc status=none
  rm -f "$OUT/core.img"
  # without this sync the qcow2 silently lost blocks here (grub rescue: normal.mod not found)
  sync
  log "qemu-img convert"
  # once here a first convert still differed from the raw disk (writeback not finished): a second
  # sync and convert, and only then an error
  for try in 1 2; do
    qemu-img convert -O qcow2 "$raw" "$OUT/box.img"
    qemu-img compare "$raw" "$OUT/box.img" > "$OUT/compare.log" 2>&1 && break
    [ "$try" = 2 ] && { echo "build.sh: box.img differs from the raw disk: $(tail -1 "$OUT/compare.log")" >&2; exit 1; }
    log "box.img differs from the raw disk ($(tail -1 "$OUT/compare.log")): sync and convert again"
    sync; sleep 5
  done
  printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$DISK_GB" > "$OUT/metadata.json"
  cp "$HERE/Vagrantfile.box" "$OUT/Vagrantfile"
  tar -C "$OUT" -cf "$BOX.tmp" metadata.json Vagrantfile box.img
  mv "$BOX.tmp" "$BOX"
  rm -f "$OUT/box.img" "$OUT/metadata.json" "$OUT/Vagrantfile"
  echo "$stamp" > "$BOX.key"
  log "built $BOX ($(du -h "$BOX" | cut -f1)) in $(( $(date +%s) - t0 )) s"
fi

# Registered already (with this build)?  vagrant keeps the key we add beside the box.
reg=$HOME/.vagrant.d/boxes/${NAME//\//-VAGRANTSLASH-}
if [ "$(cat "$reg/.testbed-key" 2>/dev/null)" = "$stamp" ]; then
  log "registered: $NAME"
else
  vagrant box add --force --name "$NAME" "$BOX" >/dev/null
  echo "$stamp" > "$reg/.testbed-key"
  log "registered $NAME"
fi
