"""Dependencies are exact: every third-party module the code imports is declared in
pyproject.toml, and every declared distribution is imported (or listed below with the
reason it is needed without an import)::

    python -m pytest tests/unit/test_dependencies.py -q
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("serving", "training", "benchmarks")
FIRST_PARTY = {"serving", "training", "tests"}
# Provided by the process that loads the module, not by a distribution.
PROVIDED = {"triton_python_backend_utils": "Triton's Python backend provides it to model.py"}
# Declared and needed, but never imported by name.
NOT_IMPORTED = {
    "nvidia-pytriton": "its tritonserver binary is run (serving.server.home finds the wheel)",
    "onnxscript": "torch.onnx.export's exporter imports it",
    "optuna": "Ray Tune's OptunaSearch (medimg tune --search optuna) imports it",
    "ruff": "a tool run by .ci/run",
    "mypy": "a tool run by .ci/run",
    "pytest-timeout": "a pytest plugin (the timeout setting in pyproject.toml)",
    "moto": "its S3 server runs as a process of its own (tests/fixtures/s3.py)",
    "yamllint": "a tool run by tests/unit/test_infra_k8s.py on infra/",
    "check-jsonschema": "a tool run by tests/unit/test_infra_monitoring.py on the Compose file",
}


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    runtime = {_name(r) for r in project["dependencies"]}
    runtime |= {_name(r) for name, reqs in extras.items() if name != "dev" for r in reqs}
    return runtime, {_name(r) for r in extras["dev"]}


def _imports(folders: tuple[str, ...]) -> dict[str, str]:
    """Top-level module imported -> the first file importing it."""
    found: dict[str, str] = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def _third_party(imports: dict[str, str]) -> dict[str, str]:
    stdlib = sys.stdlib_module_names
    return {
        m: f
        for m, f in imports.items()
        if m not in stdlib and m not in FIRST_PARTY and m not in PROVIDED and m != "__future__"
    }


@functools.cache
def _installed() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distributions(module: str) -> set[str]:
    # not installed here (tensorrt without a GPU host): the module names its distribution
    dists = _installed().get(module, [module])
    return {d.lower().replace("_", "-") for d in dists}


def test_every_imported_module_is_declared() -> None:
    runtime, dev = _declared()
    problems = []
    for scope, folders, allowed in (
        ("product", PRODUCT, runtime),
        ("tests", ("tests",), runtime | dev),
    ):
        for module, where in sorted(_third_party(_imports(folders)).items()):
            dists = _distributions(module)
            if not dists & allowed:
                problems.append(f"{where} ({scope}) imports {module!r} from {sorted(dists) or '?'}")
    assert not problems, "imported but not declared in pyproject.toml:\n" + "\n".join(problems)


def test_every_declared_distribution_is_imported() -> None:
    runtime, dev = _declared()
    imported: set[str] = set()
    for module in _third_party(_imports((*PRODUCT, "tests"))):
        imported |= _distributions(module)
    unused = sorted((runtime | dev) - imported - set(NOT_IMPORTED))
    assert not unused, f"declared in pyproject.toml but never imported: {unused}"
