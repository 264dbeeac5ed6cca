#!/usr/bin/env bash
# Install everything from this repository's files:
#   .venv          the runtime, the training/export extra (torch, open_clip) and the test tools (locks/venv.txt)
#   .venv-runtime  the runtime and the test tools without torch, for tests/runtime (locks/venv.txt)
#   QGIS, nginx    Debian's python3-qgis, qgis (qgis_process) and nginx-light (the remote-scene tests' HTTP server)
#                  (apt-get, when one is missing)
#   .qgis-venv     QGIS's own Python with the runtime's missing packages (locks/qgis-venv.txt), for the plugin suite
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

# Every version comes from the locks (locks/, refreshed by scripts/lock.sh); a lock that disagrees
# with pyproject.toml stops the set-up before anything large is installed.
python3 -m venv .venv
.venv/bin/python -m pip install -q -c locks/venv.txt packaging
.venv/bin/python scripts/check_locks.py
.venv/bin/python -m pip install -q -c locks/venv.txt -e ".[train,dev]"
# the same locked versions from pip's cache, less the train extra: no torch in this one
python3 -m venv .venv-runtime
.venv-runtime/bin/python -m pip install -q -c locks/venv.txt -e ".[dev]"

if ! /usr/bin/python3 -c "import qgis.core, rasterio" >/dev/null 2>&1 || ! command -v qgis_process.bin >/dev/null \
        || ! command -v nginx >/dev/null || ! ls /usr/share/postgresql/*/extension/postgis.control >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q python3-qgis qgis qgis-providers python3-rasterio xvfb xauth nginx-light \
        postgresql postgresql-postgis >/dev/null
fi
bash tests/qgis/setup_venv.sh .qgis-venv
