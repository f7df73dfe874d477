#!/bin/sh
# Runs inside the test guest, chrooted into the host's root (see init): the guest's share of
# the test suite under coverage of testbed/net; everything it produces goes to /results.
# Usage (from job.sh): tests.sh REPO PYTHON PYLIB MARKEXPR TEST_FILE...
REPO=$1; PY=$2; PYLIB=$3; MARK=$4; shift 4
OUT=/results
cd "$REPO" || exit 125
echo "guest: $(uname -r), $(nproc) CPUs, cgroup $(stat -fc %T /sys/fs/cgroup), $(date -u +%T)"
export TESTBED_GUEST=1
COV=
if [ -n "$PYLIB" ] && PYTHONPATH="$PYLIB" "$PY" -c "import coverage" 2>/dev/null; then
  export PYTHONPATH="$PYLIB"
  export COVERAGE_FILE="$OUT/.coverage"
  COV="-m coverage run --branch --source=testbed/net"
fi
start=$(date +%s)
# shellcheck disable=SC2086 # COV is a word list on purpose
"$PY" $COV -m pytest -p no:cacheprovider -rA -v --durations=0 -m "$MARK" \
  --junitxml="$OUT/junit.xml" -o junit_family=xunit2 "$@" > "$OUT/pytest.log" 2>&1
rc=$?
echo "guest: pytest exit $rc after $(( $(date +%s) - start )) s"
tail -n 40 "$OUT/pytest.log" | sed -n '/short test summary\|=====/,$p' > "$OUT/summary.txt"
[ -n "$COV" ] || echo "coverage: not available (no coverage package)" > "$OUT/coverage.txt"
# (the host writes the coverage report from $OUT/.coverage: same paths, ten times faster)
exit $rc
