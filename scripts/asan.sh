#!/usr/bin/env bash
# Build kvmmmu's extension modules with AddressSanitizer in a scratch copy of
# this tree and run the test suite with the sanitizer runtime preloaded.
# Fails on any test failure or ASan report.  Usage: scripts/asan.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$WORK"
cd "$WORK"
KVMMMU_SANITIZE=address "$PY" setup.py -q build_ext --inplace -j "${KVMMMU_BUILD_JOBS:-2}"
LIBASAN=$(gcc -print-file-name=libasan.so)
# Python's own allocations look like leaks to LeakSanitizer: leaks are not checked.
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1
LD_PRELOAD="$LIBASAN" PYTHONPATH="$WORK" "$PY" -m pytest -q -p no:cacheprovider "$@" \
    2>&1 | tee "$WORK/asan.log"
status=${PIPESTATUS[0]}
if grep -q "ERROR: AddressSanitizer" "$WORK/asan.log"; then
    echo "AddressSanitizer reported an error" >&2
    exit 1
fi
exit "$status"
