"""The locks in locks/ agree with pyproject.toml, and the check notices when they do not."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def load_check_locks():
    spec = importlib.util.spec_from_file_location("check_locks", REPO_ROOT / "scripts" / "check_locks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_checked_in_locks_agree_with_pyproject():
    done = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "check_locks.py")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_pin_outside_the_range_a_missing_pin_and_another_pyproject_are_reported(tmp_path):
    check_locks = load_check_locks()
    lock = check_locks.ROOT / "locks" / "venv.txt"
    recorded, pins = check_locks.read_lock(lock)
    assert recorded == check_locks.pyproject_hash() and pins["numpy"]
    problems = check_locks.disagreements(lock, ["numpy<1", "no-such-package>=1"], check_locks.VENV_ENVIRONMENT,
                                         "0" * 64)
    assert any("another pyproject.toml dependency table" in p for p in problems)
    assert any(f"numpy=={pins['numpy']} is outside" in p for p in problems)
    assert any("no-such-package is required" in p for p in problems)
    assert check_locks.disagreements(lock, ["pywin32>=1; sys_platform == 'win32'"], check_locks.VENV_ENVIRONMENT,
                                     recorded) == []


#: the venvs scripts/setup.sh makes from locks/venv.txt, and packages each must hold at the locked version
SETUP_VENVS = {
    ".venv": ("numpy", "torch", "onnx", "transformers", "pyarrow", "rasterio"),
    ".venv-runtime": ("numpy", "tokenizers", "pyarrow", "rasterio", "pytest"),
}
INSTALLED_VERSIONS = ("import json, re, importlib.metadata as m; print(json.dumps("
                      "{re.sub(r'[-_.]+', '-', d.name).lower(): d.version for d in m.distributions()}))")


@pytest.mark.parametrize("venv, packages", SETUP_VENVS.items(), ids=SETUP_VENVS)
def test_the_setup_venvs_run_the_locked_versions(venv, packages):
    python = REPO_ROOT / venv / "bin" / "python"
    if not python.is_file():
        pytest.skip(f"no {venv} here (scripts/setup.sh makes it)")
    done = subprocess.run([str(python), "-c", INSTALLED_VERSIONS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    installed = json.loads(done.stdout)
    _, pins = load_check_locks().read_lock(REPO_ROOT / "locks" / "venv.txt")
    for name in packages:
        assert installed.get(name) == pins[name], f"{venv}: {name} {installed.get(name)} is not the locked {pins[name]}"
    if venv == ".venv-runtime":
        assert not {"torch", "open-clip-torch", "transformers"} & set(installed), f"{venv} must not hold torch"
