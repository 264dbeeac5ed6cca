#!/usr/bin/env bash
# All test suites: tests/runtime in a venv without torch, tests/training in the project venv (torch),
# then the QGIS plugin suite under QGIS's Python; fails if any of them fails.
# Usage: bash tests/run_all.sh [pytest options for the runtime and training suites, e.g. -x or -k NAME]
#   RSMCLIP_RUNTIME_VENV  venv without torch (default .venv-runtime), RSMCLIP_VENV the project venv (default .venv),
#   RSMCLIP_QGIS_VENV     the QGIS venv (default .qgis-venv); scripts/setup.sh makes all three.
set -uo pipefail
cd "$(dirname "$0")/.."
runtime_venv=${RSMCLIP_RUNTIME_VENV:-.venv-runtime}
venv=${RSMCLIP_VENV:-.venv}
qgis_venv=${RSMCLIP_QGIS_VENV:-.qgis-venv}

if "$runtime_venv/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"; then
    echo "run_all.sh: $runtime_venv has torch; the runtime suite must run without it (scripts/setup.sh)" >&2
    runtime=1
else
    "$runtime_venv/bin/python" -m pytest -q tests/runtime "$@"
    runtime=$?
fi
"$venv/bin/python" -m pytest -q tests/training "$@"
training=$?
bash tests/qgis/run.sh "$qgis_venv"
plugin=$?
[ "$runtime" -eq 0 ] && [ "$training" -eq 0 ] && [ "$plugin" -eq 0 ]
