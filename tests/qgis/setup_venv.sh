#!/usr/bin/env bash
# Create the venv for the QGIS plugin suite: QGIS's own Python (/usr/bin/python3) with the system
# site-packages (Debian's qgis, numpy 1.24, rasterio on the system GDAL), plus only the missing
# runtime packages at the versions of locks/qgis-venv.txt (resolved against Debian's stack by scripts/lock.sh),
# pinned so pip never replaces numpy or brings a second GDAL (no pip rasterio).
# Usage: bash tests/qgis/setup_venv.sh [VENV_DIR]   (default .qgis-venv)
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${1:-.qgis-venv}
python=${QGIS_PYTHON:-/usr/bin/python3}

"$python" -c "import qgis.core, numpy, rasterio" || {
    echo "setup_venv.sh: $python lacks qgis/numpy/rasterio: apt-get install python3-qgis qgis-providers python3-rasterio" >&2
    exit 2
}
[ -x "$venv/bin/python" ] || "$python" -m venv --system-site-packages "$venv"
constraints="$venv/constraints.txt"
"$venv/bin/python" qgis_plugin/rsmclip_search/deps.py --constraints > "$constraints"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$constraints" -r locks/qgis-venv.txt
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
"$venv/bin/python" - <<'PY'
import sys
import numpy, rasterio, onnxruntime, tokenizers, pyarrow, shapely
from osgeo import gdal
from qgis.core import Qgis
print(f"QGIS {Qgis.QGIS_VERSION}, GDAL {gdal.__version__}, numpy {numpy.__version__}, "
      f"rasterio {rasterio.__version__} (GDAL {rasterio.__gdal_version__}), "
      f"onnxruntime {onnxruntime.__version__}, pyarrow {pyarrow.__version__}, shapely {shapely.__version__}")
for module in (numpy, rasterio):
    assert not module.__file__.startswith(sys.prefix), f"{module.__name__} must be QGIS's own, not {module.__file__}"
assert rasterio.__gdal_version__ == gdal.__version__, "rasterio is linked to another GDAL than QGIS"
PY
