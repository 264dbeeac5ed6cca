#!/usr/bin/env bash
# Both test suites: the core + training suite (project venv) and the QGIS plugin suite (QGIS's Python).
# Usage: bash tests/run_all.sh [pytest args for the core suite]
set -uo pipefail
cd "$(dirname "$0")/.."
venv=${RSMCLIP_VENV:-.venv}
qgis_venv=${RSMCLIP_QGIS_VENV:-.qgis-venv}

"$venv/bin/python" -m pytest -q "$@"
core=$?
RSMCLIP_VENV="$venv" bash tests/qgis/run.sh "$qgis_venv"
plugin=$?
[ "$core" -eq 0 ] && [ "$plugin" -eq 0 ]
