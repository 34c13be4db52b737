"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from projects import REPO_ROOT, copy_project, write_tiny_project

SAMPLE_ENV = "TEST_DATA_DIR"
SAMPLE_NAME = "cats_vs_dogs_sample"
# pytest-xdist (addopts: -n 2 --dist loadfile --no-loadscope-reorder) hands whole files to its two workers in
# collection order, two each to start with (worker 0 the 1st and 3rd, worker 1 the 2nd and 4th): the longest
# file (the Prefect flow's full pipeline runs, ~7 min) and a short one on one worker, the container tests
# (mostly waiting on Docker) on the other; then whichever is free takes the next file. (Not --dist loadgroup:
# with pytest 9.2, xdist 3.8's groups have no effect.)
FIRST = (
    "tests/integration/test_flow.py",
    "tests/containers/test_image.py",
    "tests/unit/test_split.py",
    "tests/containers/test_compose.py",
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The files of FIRST first, in that order; the rest as collected."""

    def rank(item: pytest.Item) -> int:
        return next((i for i, prefix in enumerate(FIRST) if item.nodeid.startswith(prefix)), len(FIRST))

    items.sort(key=rank)


def find_sample() -> Path | None:
    """The real photo sample (a folder holding PetImages/{Cat,Dog}): $TEST_DATA_DIR (the sample itself or
    a folder containing it), else <repo>/../shared/datasets/cats_vs_dogs_sample."""
    candidates = []
    if env := os.environ.get(SAMPLE_ENV, "").strip():
        candidates += [Path(env), Path(env) / SAMPLE_NAME]
    candidates.append(REPO_ROOT.parent / "shared" / "datasets" / SAMPLE_NAME)
    for folder in candidates:
        if all((folder / "PetImages" / name).is_dir() for name in ("Cat", "Dog")):
            return folder.resolve()
    return None


@pytest.fixture(autouse=True)
def _isolated_mlflow_uri():
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: keep one test's store out of the next test."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(before)


@pytest.fixture(scope="session")
def sample_images_dir() -> Path:
    """The folder holding the real photos in PetImages/{Cat,Dog}; skips the test when it is absent."""
    found = find_sample()
    if found is None:
        pytest.skip(
            f"real photo sample not found: set ${SAMPLE_ENV} to the {SAMPLE_NAME} folder "
            f"(or put it at {REPO_ROOT.parent / 'shared' / 'datasets' / SAMPLE_NAME})"
        )
    return found


@pytest.fixture
def project_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """Make throwaway project roots: this repo's params.yaml with a given `data` section.

    Call it as `project_factory(source, sha256=None, max_per_class=None, download=None, name="project",
    **sections)`;
    extra keyword arguments replace top-level params (e.g. `seed=7`). $DATA_SOURCE is unset for the test.
    """
    monkeypatch.delenv("DATA_SOURCE", raising=False)

    def make(
        source: str | Path,
        *,
        sha256: str | None = None,
        max_per_class: int | None = None,
        download: dict[str, Any] | None = None,
        name: str = "project",
        **sections: Any,
    ) -> Path:
        root = tmp_path / name
        root.mkdir(parents=True, exist_ok=True)
        params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
        params["data"] = {"source": str(source), "sha256": sha256, "max_per_class": max_per_class}
        if download is not None:
            params["data"]["download"] = download
        params.update(sections)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        return root

    return make


TINY_PER_CLASS = {"train": 8, "val": 4, "test": 4}


@pytest.fixture(scope="session")
def tiny_processed(sample_images_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small data/processed from real photos: {train,val,test}/{cat,dog}/*.jpg (224x224, decoded by
    catdog.preprocessing) and manifest.csv (path,label,split,group); 8/4/4 images per class and split."""
    import csv
    import itertools

    from catdog.preprocessing import decode

    processed = tmp_path_factory.mktemp("tiny") / "data" / "processed"
    rows: list[dict[str, str]] = []
    for label, folder in (("cat", "Cat"), ("dog", "Dog")):
        photos = iter(sorted((sample_images_dir / "PetImages" / folder).glob("*.jpg")))
        for split, count in TINY_PER_CLASS.items():
            for photo in itertools.islice(photos, count):
                relative = f"{split}/{label}/{photo.name}"
                (processed / relative).parent.mkdir(parents=True, exist_ok=True)
                decode(photo, size=224).save(processed / relative, quality=95)
                rows.append({"path": relative, "label": label, "split": split, "group": photo.stem})
    with (processed / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "split", "group"])
        writer.writeheader()
        writer.writerows(rows)
    return processed


@pytest.fixture(scope="session")
def trained_project(tiny_processed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project whose `train` stage ran (a tiny lite0 head on real photos); shared, so never modified."""
    from catdog.stages import train

    root = write_tiny_project(tmp_path_factory.mktemp("trained") / "project", tiny_processed)
    train.run(root)
    return root


@pytest.fixture
def trained_copy(trained_project: Path, tmp_path: Path) -> Path:
    """A private copy of `trained_project` for a test that runs later stages in it."""
    return copy_project(trained_project, tmp_path / "project")


@pytest.fixture(scope="session")
def served_project(trained_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project whose evaluate and export stages ran on the tiny real lite0 training run: models/ holds
    model.onnx (test metrics in its metadata), model.int8.onnx and the model card, and
    reports/evaluate/predictions.csv the evaluation stage's probabilities; shared, so never modified."""
    pytest.importorskip("onnxscript")
    import yaml

    from catdog.stages import evaluate, export

    root = copy_project(trained_project, tmp_path_factory.mktemp("served") / "project")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"].update(min_accuracy=0.0, min_f1=0.0, max_log_loss=100.0, worst_examples=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    evaluate.run(root)
    export.run(root)
    return root


@pytest.fixture(scope="session")
def exported_model(served_project: Path) -> Path:
    """The served project's models/ folder."""
    return served_project / "models"


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory: pytest.TempPathFactory):
    """Start prediction services (stopped when the session ends): factory(model_uri, wait_ready, **env)."""
    from service_process import start_server, stop_server

    started = []

    def make(model_uri, wait_ready: bool = True, **env: str):
        log = tmp_path_factory.mktemp("server") / "server.log"
        server = start_server(model_uri, log, wait_ready=wait_ready, **env)
        started.append(server)
        return server

    yield make
    for server in started:
        stop_server(server)


@pytest.fixture(scope="session")
def server(exported_model: Path, server_factory):
    """The service on the exported fp32 model (the e2e tests' default)."""
    return server_factory(exported_model / "model.onnx", MODEL_PRECISION="fp32")


@pytest.fixture(scope="session")
def photos(sample_images_dir: Path) -> dict[str, list[Path]]:
    """Real photos of the shared sample by class (the last ones: never in the tiny training set)."""
    return {
        label: sorted((sample_images_dir / "PetImages" / folder).glob("*.jpg"))[-20:]
        for label, folder in (("cat", "Cat"), ("dog", "Dog"))
    }
