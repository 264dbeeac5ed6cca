#!/usr/bin/env bash
# Run the QGIS plugin suite under QGIS's own Python.
# Usage: bash tests/qgis/run.sh [QGIS_VENV] [pytest args]
#   QGIS_VENV   venv made by tests/qgis/setup_venv.sh (/usr/bin/python3 -m venv --system-site-packages);
#               default .qgis-venv
# Runs offscreen (QT_QPA_PLATFORM=offscreen); set RSMCLIP_QGIS_XVFB=1 to run under xvfb-run instead.
set -uo pipefail
cd "$(dirname "$0")/../.."
venv=${1:-.qgis-venv}
shift || true
if [ ! -x "$venv/bin/python" ]; then
    echo "run.sh: no venv at $venv; create it with: bash tests/qgis/setup_venv.sh $venv" >&2
    exit 2
fi
# --confcutdir keeps the core suites' conftest.py files out; addopts there ignores tests/qgis.
cmd=("$venv/bin/python" -m pytest -q -p no:cacheprovider -o addopts= --confcutdir=tests/qgis tests/qgis "$@")
if [ "${RSMCLIP_QGIS_XVFB:-0}" = 1 ]; then
    exec xvfb-run -a -s "-screen 0 1600x1000x24" "${cmd[@]}"
fi
QT_QPA_PLATFORM=offscreen exec "${cmd[@]}"
