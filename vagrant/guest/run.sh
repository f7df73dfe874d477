#!/usr/bin/env bash
# `make test-guest`: the kernel backend's netem half and cgroup v2, for real, on any Debian 12
# machine (root, no KVM needed): Debian's kernel under QEMU/TCG with this machine's root shared
# read-only (virtio-9p) under a tmpfs overlay, running the tests marked `netem` or `guest`
# under coverage of testbed/net.  pytest's log and summary, a JUnit file, the coverage report
# and the console come back in RESULTS_DIR; the exit code is pytest's (124: timed out).
# Usage: run.sh [REPO] [PYTHON]
# Environment: TESTBED_GUEST_TIMEOUT (s, default 570), TESTBED_GUEST_MARK, TESTBED_GUEST_TESTS,
#   TESTBED_GUEST_RESULTS (default REPO/out/guest), TESTBED_GUEST_CACHE (default REPO/.cache/guest),
#   TESTBED_GUEST_CPUS, TESTBED_GUEST_MEMORY_MB, TESTBED_GUEST_ACCEL (see boot.sh).
set -euo pipefail
REPO=$(cd "${1:-$(dirname "$0")/../..}" && pwd)
PY=${2:-$REPO/.venv/bin/python}
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${TESTBED_GUEST_CACHE:-$REPO/.cache/guest}
RESULTS=${TESTBED_GUEST_RESULTS:-$REPO/out/guest}
TIMEOUT=${TESTBED_GUEST_TIMEOUT:-570}
# guest_slow (split inference: shard programs import torch over 9p) does not fit CI's budget
MARK=${TESTBED_GUEST_MARK:-(netem or guest) and not guest_slow}
# only the files that hold such tests: collecting the others (torch...) costs minutes under TCG
TESTS=${TESTBED_GUEST_TESTS:-$(cd "$REPO" && grep -rlE 'pytest\.mark\.(netem|guest)' tests --include='test_*.py' \
  | sort | tr '\n' ' ')}
log() { printf '[guest] %s\n' "$*" >&2; }

[ -x "$PY" ] || { echo "run.sh: no Python at $PY (make deps first)" >&2; exit 2; }
t0=$(date +%s)
"$HERE/prepare.sh" "$CACHE" >/dev/null
t_prep=$(( $(date +%s) - t0 ))

# coverage.py: from the venv, else a copy kept beside the kernel (the guest cannot install).
PYLIB=
if ! "$PY" -c "import coverage" 2>/dev/null; then
  PYLIB=$CACHE/pylib
  if ! PYTHONPATH=$PYLIB "$PY" -c "import coverage" 2>/dev/null; then
    log "installing coverage into $PYLIB"
    # judged by pip's own status (a filter on its quiet output would fail on no output at all)
    if ! "$PY" -m pip install -q --target "$PYLIB" coverage > "$CACHE/pip-coverage.log" 2>&1; then
      log "no coverage package (see $CACHE/pip-coverage.log): the guest runs the tests without coverage"
    fi
  fi
fi

rm -rf "$RESULTS" && mkdir -p "$RESULTS"
job=$(mktemp)
trap 'rm -f "$job"' EXIT
# shellcheck disable=SC2086 # TESTS is a list of paths
# pytest's own budget leaves time to boot, write its results and power off
printf 'exec /bin/sh %q %q %q %q %q %q %s\n' "$HERE/tests.sh" "$REPO" "$PY" "$PYLIB" "$((TIMEOUT - 110))" "$MARK" \
  "$TESTS" > "$job"
log "booting Debian's kernel under QEMU/TCG (timeout ${TIMEOUT} s; console: $RESULTS/console.log)"
t1=$(date +%s)
set +e
"$HERE/boot.sh" "$CACHE" "$RESULTS" "$TIMEOUT" "$job" > "$RESULTS/console.log" 2>&1
rc=$?
set -e
t_guest=$(( $(date +%s) - t1 ))
grep -v '^\[ *[0-9.]*\] ' "$RESULTS/console.log" | grep -e '^guest' >&2 || true
if [ -s "$RESULTS/summary.txt" ]; then
  cat "$RESULTS/summary.txt"
else
  tail -n 30 "$RESULTS/console.log"
fi
if [ -s "$RESULTS/.coverage" ]; then
  cov() { (cd "$REPO" && PYTHONPATH=$PYLIB "$PY" -m coverage "$@" --data-file="$RESULTS/.coverage"); }
  cov report --show-missing > "$RESULTS/coverage.txt" 2>&1 || true
  cov json -q -o "$RESULTS/coverage.json" >/dev/null 2>&1 || true
fi
[ -s "$RESULTS/coverage.txt" ] && grep -e '^TOTAL' -e '^coverage:' "$RESULTS/coverage.txt" \
  | sed 's/^/[guest] coverage of testbed\/net: /' >&2
log "prepare ${t_prep} s, guest ${t_guest} s; results in $RESULTS (pytest.log, junit.xml, coverage.txt)"
[ "$rc" -eq 0 ] || log "FAILED (exit $rc)"
exit "$rc"
