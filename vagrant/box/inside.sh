#!/usr/bin/env bash
# Run inside the VM by `make vm-test` (as root, in /testbed): the unit tests, the kernel-backend
# tests (the VM's Debian kernel has sch_netem and cgroup v2), and the quick suite.  Every
# result goes to /testbed/out/vm-results; the exit code is the first failure's.
set -uo pipefail
cd /testbed
export HOME=/root  # the box holds the converted SmolLM2 checkpoint under /root/.cache (build.sh)
OUT=/testbed/out/vm-results
rm -rf "$OUT" && mkdir -p "$OUT"
rc=0
step() {  # NAME COMMAND...: run, log, time
  local name=$1; shift
  local t0; t0=$(date +%s)
  echo "== $name"
  "$@" > "$OUT/$name.log" 2>&1
  local r=$?
  tail -n 3 "$OUT/$name.log"
  echo "== $name: exit $r in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/timings.txt"
  [ $r -eq 0 ] || [ $rc -ne 0 ] || rc=$r
}
# what only this VM can run comes first (netem, cgroup v2), then the quick suite, then the unit
# tests: under TCG the whole takes hours, and an interrupted run still has the first results
files=$(grep -rlE 'pytest\.mark\.(netem|guest)' tests --include='test_*.py' | sort)
# shellcheck disable=SC2086
step kernel-tests .venv/bin/python -m pytest -ra -m "netem or guest" --junitxml="$OUT/kernel-tests.xml" $files
step quick-suite .venv/bin/python -m testbed run experiments/quick.yaml --out "$OUT/quick"
# its report (summary.md, plots) is made on the host from these records (vm.sh test)
step test-quick make test-quick PYTEST_ARGS="--junitxml=$OUT/test-quick.xml"
exit $rc
