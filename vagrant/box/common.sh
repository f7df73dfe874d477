# Sourced by build.sh and vm.sh.
# apt_install PKG...: install the missing ones, without letting their maintainer scripts start
# services (libvirtd would bring up its NAT network on the host): a policy-rc.d denies starts
# for the duration when the machine has none.
apt_install() {
  local need=() p own=0
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
  done
  [ ${#need[@]} -gt 0 ] || return 0
  printf '[vm] apt-get install %s\n' "${need[*]}"
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && own=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  local rc=$?
  [ $own -eq 0 ] || rm -f /usr/sbin/policy-rc.d
  return $rc
}
