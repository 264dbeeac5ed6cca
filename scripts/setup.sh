#!/usr/bin/env bash
# Install everything from this repository's files:
#   .venv        the runtime, the training/export extra (torch, open_clip) and the test tools
#   QGIS         Debian's python3-qgis (apt-get, when QGIS's Python is missing)
#   .qgis-venv   QGIS's own Python with the runtime's missing packages, for the plugin suite
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

python3 -m venv .venv
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[train,dev]"

if ! /usr/bin/python3 -c "import qgis.core, rasterio" >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q python3-qgis qgis-providers python3-rasterio xvfb xauth >/dev/null
fi
bash tests/qgis/setup_venv.sh .qgis-venv
