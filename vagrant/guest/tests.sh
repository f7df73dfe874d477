#!/bin/sh
# Runs inside the test guest, chrooted into the host's root (see init): the guest's share of
# the test suite under coverage of testbed/net; everything it produces goes to /results.
# Usage (from job.sh): tests.sh REPO PYTHON PYLIB BUDGET_S MARKEXPR TEST_FILE...
# After BUDGET_S pytest gets a SIGINT: it stops, and still writes its summary and JUnit file.
REPO=$1; PY=$2; PYLIB=$3; BUDGET=$4; MARK=$5; shift 5
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
timeout -s INT -k 60 "$BUDGET" "$PY" $COV -m pytest -p no:cacheprovider -rA -v --durations=0 -m "$MARK" \
  --junitxml="$OUT/junit.xml" -o junit_family=xunit2 "$@" > "$OUT/pytest.log" 2>&1
rc=$?
[ $rc -ne 124 ] || echo "guest: pytest stopped after its budget of $BUDGET s" | tee -a "$OUT/pytest.log"
echo "guest: pytest exit $rc after $(( $(date +%s) - start )) s"
tail -n 40 "$OUT/pytest.log" | sed -n '/short test summary\|=====/,$p' > "$OUT/summary.txt"
[ -n "$COV" ] || echo "coverage: not available (no coverage package)" > "$OUT/coverage.txt"
# (the host writes the coverage report from $OUT/.coverage: same paths, ten times faster)
exit $rc
