"""Real `dvc repro` of the data stages in a temporary git+DVC repo, on a few dozen real photos."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from catdog.lineage import data_version
from catdog.stages.prepare import read_manifest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DATA_STAGES = ("ingest", "validate", "prepare")

pytestmark = pytest.mark.slow


def copy_sample(sample: Path, target: Path, per_class: int) -> Path:
    """A PetImages folder with the first `per_class` real photos of each class."""
    for folder in ("Cat", "Dog"):
        (target / "PetImages" / folder).mkdir(parents=True)
        for path in sorted((sample / "PetImages" / folder).glob("*.jpg"))[:per_class]:
            shutil.copy2(path, target / "PetImages" / folder / path.name)
    return target


def make_repo(root: Path, remote: Path, extra: tuple[str, ...] = ()) -> None:
    """A fresh git+DVC project holding this project's pipeline definition and code."""
    root.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", *extra):
        shutil.copy2(REPO / name, root / name)
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    run(root, "git", "init", "-q")
    run(root, "dvc", "init", "-q")
    (root / ".dvc" / "config").write_text(
        f"[core]\n    remote = local\n    analytics = false\n['remote \"local\"']\n    url = {remote}\n"
    )
    run(root, "git", "add", "-A")
    run(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")


def run(root: Path, *cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    full_env.update(env or {})
    done = subprocess.run(cmd, cwd=root, env=full_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def ran(output: str) -> set[str]:
    return {stage for stage in DATA_STAGES if f"Running stage '{stage}'" in output}


def test_dvc_repro_end_to_end(tmp_path, sample_images_dir):
    source_a = copy_sample(sample_images_dir, tmp_path / "source_a", per_class=20)
    source_b = copy_sample(sample_images_dir, tmp_path / "source_b", per_class=12)
    root = tmp_path / "project"
    make_repo(root, tmp_path / "remote")

    started = time.perf_counter()
    first = run(root, "dvc", "repro", "prepare", env={"DATA_SOURCE": str(source_a)})
    print(f"\nfirst dvc repro of {40} images: {time.perf_counter() - started:.1f}s")
    assert ran(first.stdout) == set(DATA_STAGES)
    manifest = read_manifest(root / "data" / "processed" / "manifest.csv")
    assert len(manifest) == 40
    assert {row["split"] for row in manifest} == {"train", "val", "test"}
    with Image.open(root / "data" / "processed" / manifest[0]["path"]) as img:
        assert img.size == (224, 224) and img.mode == "RGB"
    version = data_version(root / "dvc.lock")
    assert version and version.endswith(".dir")
    report = json.loads((root / "reports" / "validation.json").read_text())
    assert report["usable"] == 40 and report["passed"]

    started = time.perf_counter()
    again = run(root, "dvc", "repro", "prepare", env={"DATA_SOURCE": str(source_a)})
    print(f"second dvc repro, nothing changed: {time.perf_counter() - started:.1f}s")
    assert ran(again.stdout) == set(), again.stdout
    assert data_version(root / "dvc.lock") == version

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["prepare"]["image_size"] = 96
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    resized = run(root, "dvc", "repro", "prepare", env={"DATA_SOURCE": str(source_a)})
    assert ran(resized.stdout) == {"prepare"}
    with Image.open(root / "data" / "processed" / manifest[0]["path"]) as img:
        assert img.size == (96, 96)
    assert data_version(root / "dvc.lock") != version

    switched = run(root, "dvc", "repro", "prepare", env={"DATA_SOURCE": str(source_b)})
    assert ran(switched.stdout) == set(DATA_STAGES)
    assert len(read_manifest(root / "data" / "processed" / "manifest.csv")) == 24

    run(root, "dvc", "push")
    assert any((tmp_path / "remote").rglob("*")), "dvc push wrote to the local remote"
    shutil.rmtree(root / "data" / "processed")
    shutil.rmtree(root / ".dvc" / "cache")
    run(root, "dvc", "pull", "data/processed")
    assert len(read_manifest(root / "data" / "processed" / "manifest.csv")) == 24
    assert len(list((root / "data" / "processed").rglob("*.jpg"))) == 24
