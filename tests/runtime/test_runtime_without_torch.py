"""rsmclip_geo imports and classifies in a process where `import torch` fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


#: the shipped default bundle: it has the torch weights the torch backend loads
DEMO_BUNDLE = Path(__file__).resolve().parents[2] / "rsmclip_geo" / "models" / "rsmclip-demo-aid"  # has torch weights

BLOCK_TORCH = '''
import importlib.abc, sys

class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in ("torch", "torchvision", "open_clip", "transformers") or name.startswith(("torch.", "open_clip.")):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, BlockTorch())
'''


def run_blocked(tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(BLOCK_TORCH)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_block_is_effective(tmp_path: Path) -> None:
    result = run_blocked(tmp_path, "import torch")
    assert result.returncode != 0 and "blocked in this test" in result.stderr


def test_classify_without_torch(tiny_bundle: Path, shared_data: Path, tmp_path: Path) -> None:
    images = [str(p) for p in sorted((shared_data / "figs").glob("*.jpg"))]
    code = (
        "import sys, rsmclip_geo, rsmclip_geo.bundle, rsmclip_geo.encoders, rsmclip_geo.classify\n"
        "from rsmclip_geo.cli import main\n"
        f"code = main(['classify', *{images!r}, '--labels', 'aeroporto', 'campo de golf', '--json',"
        f" '--model', {str(tiny_bundle)!r}])\n"
        "assert 'torch' not in sys.modules and 'open_clip' not in sys.modules\n"
        "sys.exit(code)\n"
    )
    result = run_blocked(tmp_path, code)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["image"] for line in lines] == images
    assert all(line["label"] in ("aeroporto", "campo de golf") for line in lines)


def test_torch_backend_says_what_to_install(shared_data: Path, tmp_path: Path) -> None:
    image = str(sorted((shared_data / "figs").glob("*.jpg"))[0])
    code = ("import sys\nfrom rsmclip_geo.cli import main\n"
            f"sys.exit(main(['classify', {image!r}, '--labels', 'a', 'b', '--backend', 'torch',"
            f" '--model', {str(DEMO_BUNDLE)!r}]))\n")
    result = run_blocked(tmp_path, code)
    assert result.returncode == 2
    assert result.stderr.startswith("rsmclip-geo: error: the torch backend needs torch")
