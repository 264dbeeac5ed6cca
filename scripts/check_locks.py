"""Check the locks in locks/ against pyproject.toml; exit 1 with one line per disagreement.

A lock agrees with pyproject.toml when it was generated from the same dependency table (its
`pyproject-sha256` header) and pins, for every requirement that applies to its environment, a
version inside the requirement's range. Refresh the locks with `bash scripts/lock.sh`.

Usage: python scripts/check_locks.py [--pyproject-hash | --qgis-packages]
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ROOT / "locks"
#: Extras installed into .venv (scripts/setup.sh) and so locked in locks/venv.txt.
VENV_EXTRAS = ("train", "dev")
#: Packages QGIS's own Python lacks, installed into .qgis-venv (the rest comes from Debian's python3-qgis stack).
QGIS_VENV_PACKAGES = ("onnxruntime", "tokenizers", "pyarrow", "shapely", "pystac", "pystac-client", "pytest")
#: The environment locks/venv.txt is resolved for (markers are evaluated for it).
VENV_ENVIRONMENT = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                    "python_version": "3.11", "python_full_version": "3.11.0", "os_name": "posix",
                    "implementation_name": "cpython", "platform_python_implementation": "CPython"}
HASH_LINE = re.compile(r"^# pyproject-sha256: ([0-9a-f]{64})$", re.MULTILINE)


def project_table() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def pyproject_hash() -> str:
    """sha256 of the dependency table (requires-python, dependencies, optional-dependencies)."""
    project = project_table()
    table = {key: project.get(key) for key in ("requires-python", "dependencies", "optional-dependencies")}
    return hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()


def read_lock(path: Path) -> tuple[str | None, dict[str, str]]:
    """(recorded pyproject hash, {normalised name: pinned version}) of a lock file."""
    from packaging.utils import canonicalize_name

    text = path.read_text(encoding="utf-8")
    match = HASH_LINE.search(text)
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonicalize_name(name.split("[")[0])] = version.split(";")[0].strip()
    return (match.group(1) if match else None), pins


def disagreements(lock: Path, requirements: list[str], environment: dict[str, str] | None,
                  expected_hash: str) -> list[str]:
    """Why `lock` does not satisfy `requirements` (markers evaluated for `environment`; None: ignore markers)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    name = lock.relative_to(ROOT)
    if not lock.is_file():
        return [f"{name}: missing; run `bash scripts/lock.sh`"]
    recorded, pins = read_lock(lock)
    problems = []
    if recorded != expected_hash:
        problems.append(f"{name}: generated from another pyproject.toml dependency table; run `bash scripts/lock.sh`")
    for text in requirements:
        requirement = Requirement(text)
        if environment is not None and requirement.marker and not requirement.marker.evaluate(
                {**environment, "extra": ""}):
            continue
        pinned = pins.get(canonicalize_name(requirement.name))
        if pinned is None:
            problems.append(f"{name}: {requirement.name} is required ({text}) but not locked")
        elif not requirement.specifier.contains(pinned, prereleases=True):
            problems.append(f"{name}: {requirement.name}=={pinned} is outside pyproject.toml's {requirement.specifier}")
    return problems


def check() -> list[str]:
    """Every disagreement between the two locks and pyproject.toml."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = project_table()
    expected = pyproject_hash()
    venv_requirements = list(project["dependencies"])
    for extra in VENV_EXTRAS:
        venv_requirements += project["optional-dependencies"][extra]
    problems = disagreements(LOCKS / "venv.txt", venv_requirements, VENV_ENVIRONMENT, expected)
    # .qgis-venv: its own packages, held to pyproject's ranges where pyproject names them (any platform's line).
    ranges = {canonicalize_name(Requirement(r).name): Requirement(r) for r in project["dependencies"]}
    qgis_requirements = [str(ranges[canonicalize_name(p)]).split(";")[0] if canonicalize_name(p) in ranges else p
                         for p in QGIS_VENV_PACKAGES]
    problems += disagreements(LOCKS / "qgis-venv.txt", qgis_requirements, None, expected)
    return problems


def main(argv: list[str]) -> int:
    if argv == ["--pyproject-hash"]:
        print(pyproject_hash())
        return 0
    if argv == ["--qgis-packages"]:
        print(" ".join(QGIS_VENV_PACKAGES))
        return 0
    if argv:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    problems = check()
    for problem in problems:
        print(f"check_locks: {problem}", file=sys.stderr)
    if not problems:
        print("check_locks: locks/venv.txt and locks/qgis-venv.txt agree with pyproject.toml")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
