#!/usr/bin/env bash
# Run pytest from the project venv; exit code 5 (no tests collected) is a failure
# with a clear message, never a silent pass.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest: no tests were collected" >&2
    exit 1
fi
exit "$rc"
