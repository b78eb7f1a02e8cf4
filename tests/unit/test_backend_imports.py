"""The Triton Python backend's files and the training modules they import load without torch,
torchvision, Ray or MLflow: the server's Python stub has numpy, Pillow, pydicom and
onnxruntime, nothing heavier. Checked in a fresh interpreter of this environment in which
importing a blocked package raises ImportError."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BACKEND = ROOT / "serving" / "triton_backend"
BLOCKED = ("torch", "torchvision", "ray", "mlflow")

# Run with argv: the blocked names (JSON), the modules to import (JSON), the backend files
# (JSON); prints the blocked names found in sys.modules afterwards (JSON). The backend files
# import ``triton_python_backend_utils``, which only the server provides: a bare stand-in.
PROBE = """
import importlib, importlib.util, json, sys, types
blocked, modules, files = (json.loads(a) for a in sys.argv[1:4])

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"blocked: {name} (imported by the Triton backend's code)")
        return None

sys.meta_path.insert(0, Block())
sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
for name in modules:
    importlib.import_module(name)
for i, path in enumerate(files):
    spec = importlib.util.spec_from_file_location(f"backend_file_{i}", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(blocked))))
"""


def _training_imports(path: Path) -> set[str]:
    """The ``training`` modules a file imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module]
        found |= {name for name in names if name.split(".")[0] == "training"}
    return found


def _probe(modules: list[str], files: list[Path]) -> subprocess.CompletedProcess:
    args = [json.dumps(BLOCKED), json.dumps(modules), json.dumps([str(f) for f in files])]
    return subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_backend_modules_import_without_torch_ray_or_mlflow() -> None:
    files = sorted(BACKEND.glob("*.py"))
    modules = sorted(set().union(*(_training_imports(f) for f in files)))
    assert {"training.errors", "training.images", "training.spec"} <= set(modules), modules
    result = _probe(["training", *modules], files)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == []


@pytest.mark.parametrize("module", ["training.data", "training.registry"])
def test_the_probe_refuses_a_module_that_imports_them(module: str) -> None:
    result = _probe([module], [])
    assert result.returncode != 0 and "ImportError: blocked: " in result.stderr
