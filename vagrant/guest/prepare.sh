#!/usr/bin/env bash
# Prepare the test guest: Debian's own kernel (linux-image-amd64, resolved at run time) and a
# small busybox initramfs.  Cached under CACHE_DIR; only Debian packages, installed when missing.
# Usage: prepare.sh CACHE_DIR    (prints KERNEL=..., INITRD=..., KVER=..., MODULES=... lines)
set -euo pipefail
CACHE=${1:?usage: prepare.sh CACHE_DIR}
HERE=$(cd "$(dirname "$0")" && pwd)
export DEBIAN_FRONTEND=noninteractive
log() { printf '[guest] %s\n' "$*" >&2; }

[ "$(id -u)" -eq 0 ] || { echo "prepare.sh: must run as root (apt, the guest's modules)" >&2; exit 1; }

# qemu (TCG), a static busybox for the initramfs, cpio to pack it, kmod for depmod/modprobe.
need=()
for p in qemu-system-x86 busybox-static cpio kmod; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  log "apt-get install ${need[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The meta-package moves (6.1.0-NN): resolve the image package it depends on now.
pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [ -z "$pkg" ]; then  # no package lists yet on a fresh machine
  apt-get update -qq
  pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
fi
[ -n "$pkg" ] || { echo "prepare.sh: cannot resolve linux-image-amd64" >&2; exit 1; }
KDIR=$CACHE/$pkg
mkdir -p "$CACHE"
if [ ! -e "$KDIR/.done" ]; then
  log "fetching $pkg (Debian's kernel, not installed on this machine: extracted under $KDIR)"
  rm -rf "$KDIR" "$CACHE/deb" && mkdir -p "$CACHE/deb"
  (cd "$CACHE/deb" && apt-get download "$pkg" 2>&1 | grep -v -e '^W: Download is performed unsandboxed' >&2 || true)
  deb=$(ls "$CACHE"/deb/"$pkg"_*.deb)
  dpkg-deb -x "$deb" "$KDIR"
  rm -rf "$CACHE/deb"
  touch "$KDIR/.done"
fi
KVER=$(ls "$KDIR/lib/modules")
MODS=$KDIR/lib/modules/$KVER
[ -e "$MODS/modules.dep" ] || depmod -b "$KDIR" "$KVER"

# Modules the init loads itself: the way to the root (virtio, 9p, overlay) and what the kernel
# backend shapes with; anything else is modprobed from $MODS inside the guest.
BOOT_MODULES="virtio_pci virtio_rng 9pnet_virtio 9p overlay sch_netem sch_htb sch_tbf veth bridge ifb cls_u32 act_mirred"
key=$(cat "$HERE/init" "$0" | sha256sum | cut -c1-12)
INITRD=$CACHE/initrd-$KVER-$key.cpio.gz
if [ ! -e "$INITRD" ]; then
  log "building $INITRD"
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  mkdir -p "$root"/{bin,dev,proc,sys,lower,rw,newroot,results,mod}
  cp /bin/busybox "$root/bin/busybox"
  cp "$HERE/init" "$root/init" && chmod 755 "$root/init"
  : > "$root/modules"
  for m in $BOOT_MODULES; do
    # insmod lines, dependencies first; builtin ones print nothing
    modprobe -d "$KDIR" -S "$KVER" --show-depends "$m" | awk '$1 == "insmod" {print $2}' | while read -r f; do
      b=$(basename "$f")
      if [ ! -e "$root/mod/$b" ]; then
        case $f in
          *.xz) xz -dc "$f" > "$root/mod/${b%.xz}"; b=${b%.xz} ;;
          *) cp "$f" "$root/mod/$b" ;;
        esac
        echo "$b" >> "$root/modules"
      fi
    done
  done
  (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$INITRD.tmp"
  mv "$INITRD.tmp" "$INITRD"
  # Older initramfs of this cache (other init versions) are no longer needed.
  find "$CACHE" -maxdepth 1 -name 'initrd-*.cpio.gz' ! -name "$(basename "$INITRD")" -delete
fi
echo "KERNEL=$KDIR/boot/vmlinuz-$KVER"
echo "INITRD=$INITRD"
echo "KVER=$KVER"
echo "MODULES=$MODS"
